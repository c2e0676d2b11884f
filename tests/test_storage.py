"""A run directory on S3 (moto's server on loopback): the mirror, the uploads, and a whole
`dem-ray run` whose artifacts all land in the bucket and that resumes from it elsewhere."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import S3_CREDENTIALS

from dem_ray.run.manifest import sha256_file
from dem_ray.run.storage import CACHE_ENV, RunPath, RunStorage, StorageError, fetch

BIN = Path(sys.executable).parent
CREDENTIALS = S3_CREDENTIALS


@pytest.fixture(scope="module")
def s3(s3_server):
    """Run-dir URIs in a bucket of the suite's S3 server (conftest)."""
    return s3_server("dem-ray-test")


def on_node(monkeypatch, cache: Path, uri: str) -> RunStorage:
    """The run as a node whose cache is `cache` sees it."""
    monkeypatch.setenv(CACHE_ENV, str(cache))
    return RunStorage(uri)


def test_a_second_node_reads_what_the_first_uploaded(s3, tmp_path, monkeypatch) -> None:
    uri = s3("round-trip")
    first = on_node(monkeypatch, tmp_path / "a", uri)
    assert first.remote and first.local.is_relative_to(tmp_path / "a")
    (first.local / "vectors").mkdir(parents=True)
    (first.local / "vectors" / "x.safetensors").write_bytes(b"x" * 1000)
    (first.local / "manifest.json").write_text("{}")
    first.push([first.local / "vectors", first.local / "manifest.json"])

    second = on_node(monkeypatch, tmp_path / "b", uri)
    assert second.pull() == 2
    assert (second.local / "vectors" / "x.safetensors").read_bytes() == b"x" * 1000
    assert second.pull() == 0  # current copies are not fetched again
    # The uploader's own copies count as current too: nothing to fetch on its node.
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "a"))
    assert RunStorage(uri).pull() == 0


def test_a_changed_file_of_the_same_size_is_fetched_again(s3, tmp_path, monkeypatch) -> None:
    """A vector recomputed from other fine-tunes has the very same size."""
    uri = s3("same-size")
    first = on_node(monkeypatch, tmp_path / "a", uri)
    path = first.local / "vectors" / "v.safetensors"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"1" * 64)
    first.push([path])
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "b"))
    assert fetch(RunPath(uri, "vectors/v.safetensors")).read_bytes() == b"1" * 64
    time.sleep(1.1)  # object stores keep modification times to the second
    path.write_bytes(b"2" * 64)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "a"))
    RunStorage(uri).push([path])
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "b"))
    assert fetch(RunPath(uri, "vectors/v.safetensors")).read_bytes() == b"2" * 64


def test_push_of_a_directory_drops_remote_files_gone_locally(s3, tmp_path, monkeypatch) -> None:
    uri = s3("stale")
    node = on_node(monkeypatch, tmp_path / "a", uri)
    model = node.local / "merged"
    model.mkdir(parents=True)
    (model / "model-00001.safetensors").write_bytes(b"old")
    node.push([model])
    (model / "model-00001.safetensors").unlink()
    (model / "model.safetensors").write_bytes(b"new")
    node.push([model])
    assert set(node.remote_files("merged")) == {"merged/model.safetensors"}


def test_an_exact_pull_drops_what_the_bucket_lost(s3, tmp_path, monkeypatch) -> None:
    """A manifest left in the mirror must not vouch for outputs that are gone remotely."""
    uri = s3("exact")
    node = on_node(monkeypatch, tmp_path / "a", uri)
    (node.local / "report").mkdir(parents=True)
    (node.local / "report" / "report.json").write_text("{}")
    (node.local / "manifest.json").write_text("{}")
    node.push([node.local / "manifest.json"])  # the report never reached the bucket
    node.pull(exact=True)
    assert (node.local / "manifest.json").exists()
    assert not (node.local / "report" / "report.json").exists()


def test_local_run_dirs_are_plain_paths(tmp_path) -> None:
    storage = RunStorage(str(tmp_path / "run"))
    assert not storage.remote and storage.local == tmp_path / "run"
    path = storage.local / "vectors" / "a.safetensors"
    assert storage.ref(path) == str(path) and storage.show(path) == str(path)
    assert fetch(str(path)) == path
    storage.push([path])  # nothing to upload to
    assert storage.pull() == 0


def test_uri_paths_are_shown_without_their_options(s3, tmp_path, monkeypatch) -> None:
    uri = s3("shown")
    storage = on_node(monkeypatch, tmp_path / "a", uri)
    path = storage.local / "merged"
    assert storage.show(path) == "s3://dem-ray-test/shown/merged"
    assert storage.ref(path) == RunPath(uri, "merged")
    assert "endpoint_override" not in str(storage.ref(path))
    assert storage.ray_storage("ray_train") == ("dem-ray-test/shown/ray_train", storage.fs)
    outside = tmp_path / "base"
    assert storage.ref(outside) == str(outside)  # a user's local base stays a path


def test_unusable_uris_say_what_to_check(s3, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    with pytest.raises(StorageError, match="pyarrow cannot open this URI"):
        RunStorage("nosuchscheme://bucket/run")
    missing = RunStorage(s3("x").replace("dem-ray-test", "no-such-bucket"))
    with pytest.raises(StorageError) as err:
        missing.check_writable()
    message = str(err.value)
    assert message.startswith("run_dir s3://no-such-bucket/x is not writable")
    assert "bucket exists" in message and "endpoint_override" not in message.split("(")[0]


# ---- the whole pipeline ------------------------------------------------------------------
def run_cli(work: Path, home: Path, ray_tmp: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", CACHE_ENV)}
    env.update(CREDENTIALS, HOME=str(home), RAY_TMPDIR=str(ray_tmp), OMP_NUM_THREADS="1")
    return subprocess.run(
        [str(BIN / "dem-ray"), "run", "config.yaml"],
        cwd=work, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip


def files_in(root: Path) -> set[str]:
    """Files under `root`, less matplotlib's per-user font cache (a tool's, not the run's)."""
    return {
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and not p.relative_to(root).as_posix().startswith(".cache/matplotlib/")
    }


def test_a_run_on_s3_keeps_everything_in_the_bucket_and_resumes_from_it(
    s3, tiny_base, tiny_data, make_config, tmp_path, monkeypatch
) -> None:
    import pyarrow.fs as pafs

    uri = s3("runs/tiny")
    data = {n: tiny_data[n] for n in ("numbers", "letters")}
    raw = make_config(
        uri, tiny_base, data,
        finetune={"max_steps": 4, "log_every": 2, "checkpoint_every": 2},
        search={"num_trials": 3},
    )  # fmt: skip
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    (work / "config.yaml").write_text(json.dumps(raw))
    # Short paths: Ray's sockets live under RAY_TMPDIR.
    ray_tmps = [Path("/tmp") / f"dr-s3-{os.getpid()}-{i}" for i in range(2)]
    try:
        first = run_cli(work, home, ray_tmps[0])
        assert first.returncode == 0, first.stderr[-4000:]
        assert "report:       s3://dem-ray-test/runs/tiny/report/report.md" in first.stdout

        # Every artifact is in the bucket, byte for byte what the manifest recorded.
        fs, root = pafs.FileSystem.from_uri(uri)
        with fs.open_input_stream(f"{root}/manifest.json") as fh:
            manifest = json.loads(fh.read())
        outputs = {
            rel: digest
            for entry in manifest["stages"].values()
            for rel, digest in entry["outputs"].items()
        }
        for rel in ("finetune/numbers/model.safetensors", "vectors/letters.safetensors",
                    "data/numbers.train.safetensors", "search/trials.jsonl",
                    "search/best.json", "merged/model.safetensors", "report/report.json",
                    "report/report.md"):  # fmt: skip
            assert rel in outputs, rel
        mirror = on_node(monkeypatch, tmp_path / "check", uri)
        assert mirror.pull() >= len(outputs)
        for rel, digest in outputs.items():
            assert sha256_file(mirror.local / rel) == digest, rel
        trials = (mirror.local / "search" / "trials.jsonl").read_text().splitlines()
        assert len(trials) == 3
        report = json.loads((mirror.local / "report" / "report.json").read_text())
        assert report["run_dir"] == "s3://dem-ray-test/runs/tiny"
        # Ray Train kept its checkpoints in the bucket too (storage_path), and cleaned up.
        train = fs.get_file_info(pafs.FileSelector(f"{root}/ray_train", allow_not_found=True))
        assert all(i.type == pafs.FileType.Directory for i in train)

        # Nothing on the local disk outside Ray's temp dir (its mirror is there).
        assert files_in(work) == {"config.yaml"}
        assert files_in(home) == set()
        cache = ray_tmps[0] / "ray" / "dem_ray_cache"
        assert any(cache.iterdir())

        # Another machine (an empty Ray temp dir) resumes from the bucket: all done.
        second = run_cli(work, home, ray_tmps[1])
        assert second.returncode == 0, second.stderr[-4000:]
        assert "stages run: none" in second.stdout
        # Deciding that cost the manifest and one listing: no artifact was downloaded, only
        # the report's data for the summary the command prints.
        fresh = ray_tmps[1] / "ray" / "dem_ray_cache"
        fetched = {Path(f).name for f in files_in(fresh)  # less the logs it wrote itself
                   if not Path(f).name.startswith(".") and "/logs/" not in f"/{f}"}  # fmt: skip
        assert fetched == {"manifest.json", "report.json"}, fetched
        # Each command's logs went to the bucket, in a folder of its own.
        logs = fs.get_file_info(pafs.FileSelector(f"{root}/logs"))
        assert len([i for i in logs if i.type == pafs.FileType.Directory]) == 2, logs
        # A vector lost from the bucket is computed again, there; nothing else is.
        fs.delete_file(f"{root}/vectors/letters.safetensors")
        third = run_cli(work, home, ray_tmps[1])
        assert third.returncode == 0, third.stderr[-4000:]
        assert "stages run: vectors/letters\n" in third.stdout
        assert fs.get_file_info(f"{root}/vectors/letters.safetensors").size > 0
        assert files_in(work) == {"config.yaml"} and files_in(home) == set()
    finally:
        for path in ray_tmps:
            shutil.rmtree(path, ignore_errors=True)
