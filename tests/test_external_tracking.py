"""MLflow and W&B tracking (`tracking.mlflow`, `tracking.wandb`): read back from a local
MLflow file store and W&B's offline run files (no network), and compared with what the
run recorded."""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

import pytest

from dem_ray.config import ConfigError, TrackingConfig, parse_config
from dem_ray.run.external_tracking import (
    ExternalRun,
    finish_run,
    open_run,
    resolve_tracking_uri,
    run_spec,
    search_run,
    worker_run,
)
from dem_ray.run.tracking import StepEvents, TrialEvents

mlflow = pytest.importorskip("mlflow")
pytest.importorskip("wandb")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """W&B never reaches the network here, and MLflow never reads a tracking URI of the
    machine's; what the trackers (and Ray's setup_*) set in the environment is undone."""
    saved = dict(os.environ)
    for key in ("WANDB_API_KEY", "WANDB_DIR", "MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield
    os.environ.clear()
    os.environ.update(saved)
    mlflow.set_tracking_uri(None)  # setup_mlflow (a worker's) sets it for the process


# ---- reading back ---------------------------------------------------------------------------
def mlflow_runs(store: Path, experiment: str = "dem-ray") -> dict[str, object]:
    """{run name: run} of an experiment in a file store (one run per name expected)."""
    from mlflow import MlflowClient

    client = MlflowClient(Path(store).resolve().as_uri())
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r} in {store}"
    runs = client.search_runs([found.experiment_id])
    names = [r.info.run_name for r in runs]
    assert len(names) == len(set(names)), names
    return {r.info.run_name: r for r in runs}


def history(store: Path, run, key: str) -> list[tuple[int, float]]:
    from mlflow import MlflowClient

    client = MlflowClient(Path(store).resolve().as_uri())
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))


def wandb_runs(root: Path) -> dict[str, dict]:
    """{run name: {id, tags, config, rows}} of the W&B offline runs under `root` (each
    run's `.wandb` file: LevelDB-log framed protobuf records, as `wandb sync` reads them)."""
    from wandb.proto import wandb_internal_pb2 as pb

    runs: dict[str, dict] = {}
    for path in sorted(Path(root).glob("wandb/offline-run-*/run-*.wandb")):
        run: dict = {"rows": []}
        for chunk in _log_records(path.read_bytes()):
            record = pb.Record()
            record.ParseFromString(chunk)
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run["id"], run["name"] = record.run.run_id, record.run.display_name
                run["tags"] = list(record.run.tags)
                run["config"] = {i.key: json.loads(i.value_json) for i in record.run.config.update}
            elif kind == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                       for i in record.history.item}  # fmt: skip
                run["rows"].append(row)
        assert run["name"] not in runs, f"two W&B runs named {run['name']}"
        runs[run["name"]] = run
    return runs


def _log_records(data: bytes):
    """W&B's datastore: a 7-byte header (`:W&B`, ident, version), then 32 KiB blocks of
    records (crc32 u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last)."""
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk
        else:
            return


def series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(row["_step"], row[key]) for row in rows if key in row]


def tracking(tmp_path: Path, **which) -> TrackingConfig:
    settings = {"mlflow": {"tracking_uri": str(tmp_path / "mlruns")}, "wandb": {"mode": "offline"}}
    return TrackingConfig(**{k: settings[k] for k, on in which.items() if on})


# ---- the sinks, no Ray ----------------------------------------------------------------------
def test_a_search_run_replays_the_kept_trials_then_logs_each_new_one(tmp_path):
    spec = run_spec(tracking(tmp_path, mlflow=True, wandb=True), "/runs/r", "search",
                    {"seed": 3, "space": "simplex"}, tmp_path, stage="search")  # fmt: skip
    kept = [{"trial": 0, "objective": 3.0, "weights": {"code": 0.25, "numbers": 0.75}},
            {"trial": 1, "objective": 2.5, "complete": False, "weights": {"code": 1.0}}]  # fmt: skip
    events = TrialEvents(tmp_path / "tb", kept, search_run(spec, "digest", len(kept)))
    events.add({"trial": 2, "objective": 1.5, "weights": {"code@block1": 0.5}},
               {"objective": 1.5})  # fmt: skip
    events.close()

    store = tmp_path / "mlruns"
    run = mlflow_runs(store)["search"]
    assert run.info.status == "FINISHED"
    assert history(store, run, "objective") == [(0, 3.0), (1, 2.5), (2, 1.5)]
    assert history(store, run, "best_objective") == [(0, 3.0), (1, 3.0), (2, 1.5)]
    assert history(store, run, "weight/code") == [(0, 0.25), (1, 1.0)]
    assert history(store, run, "weight/code.block1") == [(2, 0.5)]  # `@` is no MLflow name
    assert run.data.params == {"seed": "3", "space": "simplex"}
    tags = run.data.tags
    assert tags["dem_ray.stage"] == "search" and tags["dem_ray.run_dir"] == "/runs/r"
    assert tags["dem_ray.inputs"] == "digest" and tags["dem_ray.resumed_trials"] == "2"

    [wb] = wandb_runs(tmp_path).values()  # `files_dir`/wandb/
    assert wb["name"] == "search" and wb["tags"] == ["search"]
    assert wb["config"]["params"] == {"seed": 3, "space": "simplex"}
    assert series(wb["rows"], "objective") == [(0, 3.0), (1, 2.5), (2, 1.5)]
    assert series(wb["rows"], "best_objective") == [(0, 3.0), (1, 3.0), (2, 1.5)]
    assert series(wb["rows"], "weight/code.block1") == [(2, 0.5)]


def test_a_restarted_worker_writes_each_step_once_into_the_drivers_run(tmp_path):
    """What a fine-tune's rank-0 workers do (through Ray's setup_mlflow / setup_wandb,
    here outside a Train session): the first logs steps 1-3 and checkpoints at 2, then
    dies; the restarted one replays 3-5 from that checkpoint."""
    spec = run_spec(tracking(tmp_path, mlflow=True, wandb=True), "/runs/r", "finetune/code",
                    {"max_steps": 5, "learning_rate": 1e-3}, tmp_path, stage="finetune",
                    dataset="code")  # fmt: skip
    opened = open_run(spec)
    assert opened.mlflow["run_id"] and opened.wandb["id"]

    lost = StepEvents(None, extra=worker_run(opened))
    for step in (1, 2, 3):
        lost.write(step, {"loss": 10.0 - step, "lr": 0.001})
        if step == 2:
            lost.save_into(tmp_path / "ckpt")  # flushes the tracker: steps 1-2 are in it
    lost.close()  # (a dead worker never closes; its queued step 3 is in the run or not)

    resumed = StepEvents(None, tmp_path / "ckpt", extra=worker_run(opened))
    for step in (3, 4, 5):
        resumed.write(step, {"loss": 20.0 - step, "lr": 0.001})
    resumed.close()
    finish_run(opened, failed=False)

    store = tmp_path / "mlruns"
    run = mlflow_runs(store)["finetune/code"]
    assert run.info.run_id == opened.mlflow["run_id"]
    # Step 3 once: the lost worker's (the restart replays the same batch, the same loss).
    assert history(store, run, "loss") == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 16.0), (5, 15.0)]
    assert [s for s, _ in history(store, run, "lr")] == [1, 2, 3, 4, 5]
    assert run.info.status == "FINISHED"
    assert run.data.params == {"max_steps": "5", "learning_rate": "0.001"}
    assert run.data.tags["dem_ray.dataset"] == "code"
    assert run.data.tags["mlflow.runName"] == "finetune/code"

    # W&B offline: each worker start writes its own file of the one run id (online, W&B
    # resumes that run and keeps rows of increasing steps only).
    runs = sorted(Path(tmp_path).glob("wandb/offline-run-*/run-*.wandb"))
    assert runs and all(p.stem == f"run-{opened.wandb['id']}" for p in runs)


def test_a_failed_fine_tune_closes_its_mlflow_run_as_failed(tmp_path):
    opened = open_run(run_spec(tracking(tmp_path, mlflow=True), "/r", "finetune/x", {}))
    finish_run(opened, failed=True)
    assert mlflow_runs(tmp_path / "mlruns")["finetune/x"].info.status == "FAILED"


def test_a_tracker_that_fails_mid_run_is_dropped_not_the_run(tmp_path, caplog):
    sink = ExternalRun(run_spec(tracking(tmp_path, mlflow=True), "/r", "search", {}))
    sink.write(0, {"objective": 1.0})
    tracker = sink._trackers[0]

    def broken(step, metrics):
        raise ConnectionError("the server went away")

    tracker.log = broken
    sink.write(1, {"objective": 0.5})  # warned, not raised
    sink.write(2, {"objective": 0.25})
    sink.close()
    assert "stopped logging run 'search' at step 1" in caplog.text
    run = mlflow_runs(tmp_path / "mlruns")["search"]
    assert history(tmp_path / "mlruns", run, "objective") == [(0, 1.0)]


def test_no_tracking_section_no_sink():
    assert run_spec(None, "/r", "search", {}) is None
    assert run_spec(TrackingConfig(), "/r", "search", {}) is None
    assert open_run(None) is None and worker_run(None) is None
    assert search_run(None, "x", 0) is None


def test_tracking_uris_are_made_absolute_on_the_driver(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri("mlruns") == (tmp_path / "mlruns").as_uri()
    assert resolve_tracking_uri("sqlite:///t.db") == f"sqlite:///{tmp_path / 't.db'}"
    assert resolve_tracking_uri("http://mlflow:5000") == "http://mlflow:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://elsewhere:5000")
    assert resolve_tracking_uri(None) == "http://elsewhere:5000"


# ---- the config -----------------------------------------------------------------------------
RAW = {"run_dir": "/tmp/r", "base_model": "/tmp/b", "datasets": {"a": "/a", "b": "/b"}}


@pytest.mark.parametrize("tracker", ["mlflow", "wandb"])
def test_a_tracker_that_is_not_installed_fails_the_config_clearly(tracker, monkeypatch):
    monkeypatch.setitem(sys.modules, tracker, None)  # `import mlflow` fails, as uninstalled
    with pytest.raises(ConfigError) as err:
        parse_config({**RAW, "tracking": {tracker: {}}}, source="run.yaml")
    assert str(err.value) == (
        f"run.yaml: tracking.{tracker} needs {tracker}: pip install 'dem-ray[{tracker}]'"
    )
    parse_config({**RAW, "tracking": {}})  # no tracker named: nothing needed


def test_tracking_keys_are_checked():
    cfg = parse_config({**RAW, "tracking": {"mlflow": True, "wandb": {"mode": "offline"}}})
    assert cfg.tracking.mlflow.experiment == "dem-ray" and cfg.tracking.wandb.mode == "offline"
    assert parse_config({**RAW, "tracking": {"mlflow": False}}).tracking.mlflow is None
    for bad, message in [
        ({"mlfow": {}}, "unknown key 'tracking.mlfow'; did you mean 'mlflow'?"),
        ({"wandb": {"mode": "off"}}, "'tracking.wandb.mode' is 'off'; choose one of online"),
        ({"mlflow": {"experiment": ""}}, "tracking.mlflow.experiment"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
            parse_config({**RAW, "tracking": bad})


# ---- a real run: fine-tunes on Ray Train, a search ------------------------------------------
@pytest.fixture(scope="module")
def tracked(ray_session, tiny_base, tiny_data, make_config, tmp_path_factory):
    from dem_ray.pipeline import Pipeline

    root = tmp_path_factory.mktemp("external_tracking")
    data = {n: tiny_data[n] for n in ("code", "numbers")}
    store = root / "mlruns"
    raw = make_config(root / "run", tiny_base, data,
                      finetune={"max_steps": 4, "log_every": 2, "checkpoint_every": 2},
                      search={"num_trials": 3},
                      tracking={"mlflow": {"tracking_uri": str(store), "experiment": "tiny"},
                                "wandb": {"mode": "offline", "project": "tiny"}})  # fmt: skip
    config_path = root / "config.yaml"
    config_path.write_text(json.dumps(raw))
    with pytest.MonkeyPatch.context() as env:
        for key in ("WANDB_DIR", "WANDB_API_KEY", "MLFLOW_TRACKING_URI"):
            env.delenv(key, raising=False)
        env.setenv("WANDB_SILENT", "true")
        env.setenv("WANDB_MODE", "offline")
        pipeline = Pipeline(parse_config(raw, source=str(config_path)))
        pipeline.run(("finetune", "vectors", "search"))  # (prepare comes first)
    return pipeline, raw, config_path, store


def test_mlflow_has_a_run_per_fine_tune_with_each_step_once(tracked):
    from test_tracking import scalars

    from dem_ray.run.tracking import finetune_events

    pipeline, _, _, store = tracked
    runs = mlflow_runs(store, "tiny")
    assert set(runs) == {"finetune/code", "finetune/numbers", "search"}
    for name in pipeline.names:
        run = runs[f"finetune/{name}"]
        assert run.info.status == "FINISHED"
        loss = history(store, run, "loss")
        assert [s for s, _ in loss] == [1, 2, 3, 4]
        assert loss[-1][1] == pytest.approx(pipeline.manifest.entry(f"finetune/{name}")
                                            ["final_loss"])  # fmt: skip
        board = scalars(finetune_events(pipeline.run_dir, name))  # TensorBoard says the same
        assert [v for _, v in loss] == pytest.approx([v for _, v in board["loss"]], rel=1e-6)
        for key in ("lr", "tokens_per_s"):
            assert [s for s, _ in history(store, run, key)] == [1, 2, 3, 4]
        assert run.data.params["max_steps"] == "4"
        assert run.data.tags["dem_ray.dataset"] == name
        assert run.data.tags["dem_ray.run_dir"] == pipeline.cfg.run_dir


def test_mlflow_search_run_equals_the_trial_log(tracked):
    from dem_ray.ray.search import read_trials

    pipeline, raw, _, store = tracked
    trials = read_trials(pipeline.layout.trials)
    assert len(trials) == raw["search"]["num_trials"]
    run = mlflow_runs(store, "tiny")["search"]
    assert history(store, run, "objective") == [(t["trial"], t["objective"]) for t in trials]
    for name in pipeline.names:
        got = history(store, run, f"weight/{name}")
        assert got == [(t["trial"], t["weights"][name]) for t in trials]
    assert run.data.tags["dem_ray.inputs"] == pipeline.manifest.entry("search")["inputs"]


def test_wandb_offline_has_the_same_steps(tracked):
    pipeline, _, _, store = tracked
    runs = wandb_runs(pipeline.run_dir)  # RUN_DIR/wandb/: the workers' and the driver's
    assert set(runs) == {"finetune/code", "finetune/numbers", "search"}
    mlflow = mlflow_runs(store, "tiny")
    for name, run in runs.items():
        for key in ("loss",) if name != "search" else ("objective", "best_objective"):
            assert series(run["rows"], key) == history(store, mlflow[name], key)


def test_adding_or_changing_tracking_leaves_every_stage_up_to_date(tracked):
    from dem_ray.status import run_status

    pipeline, raw, config_path, _ = tracked
    ran = {"data/code", "data/numbers", "finetune/code", "finetune/numbers", "vectors/code",
           "vectors/numbers", "search"}  # fmt: skip
    states = {}
    for variant in ({k: v for k, v in raw.items() if k != "tracking"},
                    {**raw, "tracking": {"wandb": {"mode": "disabled"}}}):  # fmt: skip
        status = run_status(parse_config(variant, source=str(config_path)))
        states[len(states)] = {s.key: s.state for s in status.steps}
        assert {k for k, state in states[len(states) - 1].items() if state == "done"} >= ran
    assert states[0] == states[1]


def test_a_fine_tune_whose_worker_dies_keeps_one_run_with_each_step_once(
    ray_session, tracked, tmp_path, monkeypatch
):
    """Ray Train restarts the lost worker from its checkpoint of step 2; the restarted
    worker writes into the same MLflow run, and step 3 is there once."""
    from ray import cloudpickle
    from worker_hooks import exit_once as _exit_once

    from dem_ray.ray import finetune
    from dem_ray.ray.finetune import FinetuneJob, run_finetunes

    pipeline, _, _, _ = tracked
    hp = pipeline.cfg.finetune.model_copy(update={"max_steps": 6, "checkpoint_every": 2})
    store = tmp_path / "mlruns"
    spec = run_spec(tracking(tmp_path, mlflow=True), "/r", "finetune/faulty", {"max_steps": 6})
    shard = {"code": str(pipeline.layout.shard("code", "train"))}
    job = FinetuneJob("faulty", str(pipeline.ctx.base_dir), shard, str(tmp_path / "model"),
                      events_dir=str(tmp_path / "events"), tracking=spec)  # fmt: skip
    marker, storage = tmp_path / "fault-fired", tmp_path / "ray_train"
    cloudpickle.register_pickle_by_value(sys.modules["worker_hooks"])
    monkeypatch.setattr(finetune, "AFTER_STEP", _exit_once(marker, "faulty", 3, storage))
    try:
        results, errors = run_finetunes([job], hp, storage)
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules["worker_hooks"])
    assert errors == {} and marker.exists()
    assert results["faulty"]["resumed_from_step"] == 2
    run = mlflow_runs(store)["finetune/faulty"]  # one run, whatever restarted
    assert run.info.status == "FINISHED"
    loss = history(store, run, "loss")
    assert [s for s, _ in loss] == [1, 2, 3, 4, 5, 6]
    assert loss[-1][1] == pytest.approx(results["faulty"]["final_loss"])


def test_fine_tunes_opening_runs_at_once_share_one_experiment(tmp_path, monkeypatch):
    """Each fine-tune's thread opens its run; none may create a second experiment of the
    same name (its run would be in the one a reader does not pick)."""
    import threading

    from mlflow import MlflowClient
    from mlflow.store.tracking.file_store import FileStore

    from dem_ray.run import external_tracking

    checked = FileStore._validate_experiment_does_not_exist

    def slow_check(self, name):  # widen the store's window between checking and creating
        checked(self, name)
        threading.Event().wait(0.1)

    monkeypatch.setattr(FileStore, "_validate_experiment_does_not_exist", slow_check)
    settings = {"tracking_uri": (tmp_path / "mlruns").as_uri(), "experiment": "race"}
    ids, start = [], threading.Barrier(4)

    def open_one() -> None:
        start.wait()
        ids.append(external_tracking._mlflow_client(settings)[1])

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ids) == 4 and len(set(ids)) == 1, ids
    client = MlflowClient(settings["tracking_uri"])
    assert [e.name for e in client.search_experiments()].count("race") == 1
