"""Shared fixtures: one Ray session for the whole suite, and a tiny base model with data."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

STYLES = ("numbers", "letters", "code")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """One local Ray instance for every test that needs Ray (starting one costs ~6 s)."""
    import ray

    temp_dir = Path("/tmp") / f"demray-{os.getpid()}"
    ray.init(
        address="local",  # never attach to a head that `ray start` left on this host
        num_cpus=4,
        include_dashboard=False,
        _temp_dir=str(temp_dir),
        log_to_driver=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}},
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny Llama (tied embeddings) with a BPE tokenizer trained on the test styles."""
    from dem_ray.models.tiny import make_tiny_model, synthetic_corpus

    texts = [t for s in STYLES for t in synthetic_corpus(s, 150, seed=7)]
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "base", texts)


@pytest.fixture(scope="session")
def pretrained_base(tmp_path_factory) -> Path:
    """The tiny Llama after a short pre-training on all three styles: a base that knows
    something, so specialists and composites behave as they would on a real model."""
    from dem_ray.models.tiny import make_tiny_model, pretrain_tiny_model, synthetic_corpus

    texts = [t for s in STYLES for t in synthetic_corpus(s, 150, seed=7)]
    base = make_tiny_model(tmp_path_factory.mktemp("pretrained") / "base", texts)
    pretrain_tiny_model(base, [t for s in STYLES for t in synthetic_corpus(s, 100, seed=11)],
                        steps=150)  # fmt: skip
    return base


@pytest.fixture(scope="session")
def chat_base(tmp_path_factory) -> Path:
    """A tiny Llama whose tokenizer has ChatML turn markers and a chat template."""
    from dem_ray.models.tiny import make_tiny_model, synthetic_corpus

    texts = [t for s in STYLES for t in synthetic_corpus(s, 60, seed=3)]
    return make_tiny_model(tmp_path_factory.mktemp("chat") / "base", texts, chat=True)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    from dem_ray.models.tiny import synthetic_corpus, write_jsonl

    root = tmp_path_factory.mktemp("data")
    return {s: write_jsonl(root / f"{s}.jsonl", synthetic_corpus(s, 160, seed=1)) for s in STYLES}


def tiny_config(run_dir: Path, base: Path, data: dict[str, Path], **overrides) -> dict:
    """A run config (as plain data) small enough for a few seconds per stage."""
    config = {
        "run_dir": str(run_dir),
        "base_model": str(base),
        "datasets": {
            name: {"path": str(path), "validation_fraction": 0.15} for name, path in data.items()
        },
        "finetune": {
            "max_steps": 12,
            "batch_size": 8,
            "seq_len": 32,
            "learning_rate": 3.0e-3,
            "cpus_per_worker": 0.5,
            "torch_threads": 1,
            "log_every": 6,
        },
        # The simplex (not the per-block default): the tests check weights that sum to 1.
        "search": {"space": "simplex", "num_trials": 6, "max_concurrent": 2, "seed": 0},
        "evaluator": {
            "num_actors": 1,
            "cpus_per_actor": 0.5,
            "torch_threads": 1,
            "max_validation_sequences": 16,
        },
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


@pytest.fixture(scope="session")
def make_config():
    return tiny_config


def stand_in_run(raw: dict, config_path: Path, noise: float = 0.02):
    """A run through `vectors` without Ray or training: stand-in fine-tunes are the base
    plus seeded noise, recorded in the manifest as the finetune stage would record them.
    Seconds instead of minutes, for tests of the stages that come after."""
    import json
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from dem_ray.config import parse_config
    from dem_ray.pipeline import Pipeline

    config_path.write_text(json.dumps(raw))
    pipeline = Pipeline(parse_config(raw, source=str(config_path)))
    pipeline.open()
    pipeline.run_command("prepare")
    base = load_file(pipeline.ctx.base_dir / "model.safetensors")
    for i, name in enumerate(pipeline.names):
        out = pipeline.layout.finetune(name)
        shutil.copytree(pipeline.ctx.base_dir, out)
        gen = torch.Generator().manual_seed(i)
        moved = {k: v + noise * torch.randn(v.shape, generator=gen) for k, v in base.items()}
        save_file(moved, out / "model.safetensors", metadata={"format": "pt"})
        record_finetune(pipeline, name)
    pipeline.run_command("vectors")
    return pipeline


def record_finetune(pipeline, name: str) -> None:
    """Record `finetune/<name>` as the finetune stage would, for what is in its dir now."""
    from dem_ray.stages.finetune import FinetuneStage

    [step] = [s for s in FinetuneStage().steps(pipeline.ctx) if s.key == f"finetune/{name}"]
    pipeline.ctx.record(step, [pipeline.layout.finetune(name)])


S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # never wait for an instance metadata service
}


@pytest.fixture(scope="session")
def s3_server():
    """An S3 server (moto) on 127.0.0.1; yields `bucket(name)`, which creates a bucket and
    returns a function making run-dir URIs in it."""
    import logging

    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in S3_CREDENTIALS}
    os.environ.update(S3_CREDENTIALS)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    query = f"endpoint_override={host}:{port}&scheme=http&region=us-east-1"

    def bucket(name: str):
        fs, _ = pafs.FileSystem.from_uri(f"s3://{name}?{query}&allow_bucket_creation=true")
        fs.create_dir(name)
        return lambda path: f"s3://{name}/{path}?{query}"

    try:
        yield bucket
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def wait_for(predicate, timeout: float, what: str) -> None:
    """Poll for an event (a file appearing, a process ending), failing after `timeout`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def kill_processes_under(temp_dir: Path) -> None:
    """SIGKILL the processes of the killed driver's private Ray (found by its temp dir),
    and no others (never `ray stop`); wait until they are gone, then remove the dir."""
    killed = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if str(temp_dir) in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGKILL)
                killed.append(Path("/proc") / proc.name)
    deadline = time.monotonic() + 15
    while any(p.exists() for p in killed) and time.monotonic() < deadline:
        time.sleep(0.05)
    shutil.rmtree(temp_dir, ignore_errors=True)


def lines_in(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _free_ports(count: int) -> list[int]:
    """Ports free on loopback now, for a Ray head the test starts and stops itself."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture(scope="session")
def free_ports():
    return _free_ports
