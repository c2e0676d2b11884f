"""`ray job submit -- dem-ray run CONFIG` against a head started with `ray start --head`.

The head runs with Ray's token authentication on (`RAY_AUTH_MODE=token`), as every cluster in
cluster/ does: it refuses a submission without the token, and every call here that should get
through carries it. The token is made here and handed over in `RAY_AUTH_TOKEN`, which Ray reads
before any token file, so `~/.ray/auth_token` on this host plays no part. The head runs in its
own process group on loopback ports picked here, and only that group is stopped at the end
(never `ray stop`, which would stop every Ray on the host).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import NamedTuple

import pytest
from ray.exceptions import AuthenticationError
from ray.job_submission import JobStatus

BIN = Path(sys.executable).parent


class Head(NamedTuple):
    url: str  # the dashboard, which serves the Jobs API
    temp_dir: Path
    token: str


def ray_env(temp_dir: Path, token: str | None) -> dict[str, str]:
    """The environment of the head (and its jobs) or of a `ray` client: with `token`, token
    authentication on and that token; without, neither (Ray's default for a client: it sends
    no token)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH_"))}
    env.update(
        # `ray start` notes the head's address under RAY_TMPDIR, not in /tmp/ray where a plain
        # `ray.init()` elsewhere on this host would find and join it.
        RAY_TMPDIR=str(temp_dir),
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # `dem-ray` for the job's entrypoint
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    if token is not None:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    return env


def jobs_client(head: Head):
    """A Jobs API client in this process (where conftest turns Ray's auth mode off), sending
    the head's token itself."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(head.url, headers={"Authorization": f"Bearer {head.token}"})


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory, free_ports):
    """A head with token authentication on and the dashboard (the Jobs API) on 127.0.0.1."""
    gcs, dashboard, agent, client = free_ports(4)
    temp_dir = Path("/tmp") / f"demray-job-{os.getpid()}"
    (temp_dir / "ray").mkdir(parents=True, exist_ok=True)  # where RAY_TMPDIR notes the address
    head = Head(f"http://127.0.0.1:{dashboard}", temp_dir, secrets.token_hex(32))
    log = (tmp_path_factory.mktemp("head") / "ray_start.log").open("w")
    process = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block",
         "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}",
         f"--temp-dir={temp_dir}", "--num-cpus=4", "--disable-usage-stats"],
        env=ray_env(temp_dir, head.token), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                pytest.fail(f"ray start exited {process.returncode}; see {log.name}")
            try:
                jobs_client(head).list_jobs()  # the dashboard answers (to the token)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        yield head
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit(
    head: Head, working_dir: Path, *entrypoint: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """The command a user types: waits for the job and streams its log. With the head's token
    unless `env` says otherwise."""
    return subprocess.run(
        [str(BIN / "ray"), "job", "submit", f"--address={head.url}",
         f"--working-dir={working_dir}", "--", *entrypoint],
        env=env or ray_env(head.temp_dir, head.token), capture_output=True, text=True,
        timeout=420,
    )  # fmt: skip


def job_of(head: Head, output: str) -> tuple[JobStatus, str]:
    """The status and full log of the job that `ray job submit` printed the id of."""
    client = jobs_client(head)
    marker = "Job 'raysubmit_"
    start = output.index(marker) + len("Job '")
    job_id = output[start : output.index("'", start)]
    return client.get_job_status(job_id), client.get_job_logs(job_id)


def test_a_submission_without_the_token_is_refused(ray_head, tmp_path):
    """The head is locked: `ray job submit` without the token, or a client with another token,
    is turned away by the head (the errors quote its 401 and 403) before anything is uploaded,
    and no job appears."""
    with urllib.request.urlopen(f"{ray_head.url}/api/authentication_mode") as answer:
        assert json.load(answer) == {"authentication_mode": "token"}
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "marker.txt").write_text("never uploaded\n")
    home = tmp_path / "home"  # no ~/.ray/auth_token there, whatever this host's home holds
    home.mkdir()
    jobs_before = len(jobs_client(ray_head).list_jobs())

    no_token = {**ray_env(ray_head.temp_dir, None), "HOME": str(home)}
    done = submit(ray_head, job_dir, "echo", "ran", env=no_token)
    out = done.stdout + done.stderr
    assert done.returncode != 0, out[-3000:]
    assert "Authentication required: Unauthorized: Missing authentication token" in out, out
    assert "Uploading package" not in out and "submitted successfully" not in out

    wrong = Head(ray_head.url, ray_head.temp_dir, secrets.token_hex(32))
    with pytest.raises(AuthenticationError, match="Forbidden: Invalid authentication token"):
        jobs_client(wrong).submit_job(entrypoint="echo ran")

    assert len(jobs_client(ray_head).list_jobs()) == jobs_before


def test_job_runs_the_pipeline(ray_head, tiny_base, tiny_data, make_config, tmp_path):
    run_dir = tmp_path / "run"
    data = {n: tiny_data[n] for n in ("numbers", "letters")}
    raw = make_config(
        run_dir, tiny_base, data,
        finetune={"max_steps": 4, "log_every": 2}, search={"num_trials": 3},
    )  # fmt: skip
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "config.yaml").write_text(json.dumps(raw))

    done = submit(ray_head, job_dir, "dem-ray", "run", "config.yaml")  # with the token
    status, logs = job_of(ray_head, done.stdout + done.stderr)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert done.returncode == 0, done.stderr[-3000:]
    # `ray job submit` followed the job's log (a websocket to the locked head) as it ran.
    assert "merged weights:" in done.stdout, done.stdout[-3000:]
    # Progress reached the job log: stages, fine-tune steps, search trials, the answer.
    for line in (
        "stage finetune/numbers: running",
        "[finetune numbers] step 4/4",
        "search: trial 3/3 objective",
        "search done: best objective",
        "merged weights:",
    ):
        assert line in logs, f"{line!r} missing from the job log:\n{logs[-3000:]}"
    # Only dem-ray's lines: Ray's own (controller, raylet, core worker, worker prefixes,
    # event markers) are in the run dir's logs instead.
    for internal in ("TrainController", "(raylet)", "core_worker", "pid=", "::dem-ray-event::",
                     "View detailed results", "Loading weights"):  # fmt: skip
        assert internal not in logs, f"{internal!r} in the job log:\n{logs[-3000:]}"
    [logs_dir] = (run_dir / "logs").iterdir()  # one command, one folder
    assert logs_dir.name.endswith("-run") and f"logs: {logs_dir}" in logs
    assert "TrainController" in (logs_dir / "workers.log").read_text()
    assert "stage finetune/numbers: running" in (logs_dir / "dem-ray.log").read_text()
    for path in (
        "manifest.json",
        "finetune/numbers/model.safetensors",
        "vectors/letters.safetensors",
        "search/trials.jsonl",
        "merged/model.safetensors",
        "report/report.json",
    ):
        assert (run_dir / path).is_file(), path
    trials = (run_dir / "search" / "trials.jsonl").read_text().splitlines()
    assert len(trials) == 3


def test_bad_config_job_fails_fast_with_the_error(ray_head, tmp_path):
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "bad.yaml").write_text(
        "run_dir: /tmp/never\nbase_model: m\ndatasets: {a: a.jsonl, b: b.jsonl}\n"
        "finetune: {learning_rat: 0.1}\n"
    )
    start = time.monotonic()
    done = submit(ray_head, job_dir, "dem-ray", "run", "bad.yaml")
    status, logs = job_of(ray_head, done.stdout + done.stderr)
    assert status == JobStatus.FAILED, logs
    assert "bad.yaml: unknown key 'finetune.learning_rat'; did you mean 'learning_rate'?" in logs
    assert done.returncode != 0
    assert time.monotonic() - start < 60
    assert not Path("/tmp/never").exists()
