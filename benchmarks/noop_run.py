"""What a `dem-ray run` costs when nothing needs to run: seconds and bytes read.

A finished run dir is built once (cached): the base (tiny, or SmolLM2-135M in fp32),
three stand-in fine-tunes (the base plus N(0, 1e-3^2) noise, recorded as the finetune
stage records them), then the vectors, a 2-trial search, the merge and the report
through the real stages. Then `dem-ray run CONFIG` runs in a fresh child process,
alternately as it does by default (outputs whose size and modification time are those
recorded are trusted) and with `--verify` (every output re-hashed, which is what every
no-op run did before), and the child reports its wall time and the bytes its read()
calls returned (`rchar` of /proc/self/io) and the bytes it hashed.

    python benchmarks/noop_run.py --size smollm2 --repeats 3
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

CHILD = textwrap.dedent(
    """
    import json, sys, time
    start = time.perf_counter()
    from dem_ray import cli
    from dem_ray.run import manifest
    hashed = []
    real = manifest.Manifest.__init__
    def init(self, *a, **k):
        real(self, *a, **k)
        hashed.append(self)
    manifest.Manifest.__init__ = init
    code = cli.main(sys.argv[1:])
    io = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
    print(json.dumps({"code": code, "seconds": time.perf_counter() - start,
                      "rchar": int(io["rchar"]), "read_bytes": int(io["read_bytes"]),
                      "hashed": sum(m.bytes_hashed for m in hashed)}), file=sys.stderr)
    """
)


def build_run(base: Path, root: Path) -> Path:
    """A finished run of every stage (stand-in fine-tunes) and its config; returns the config."""
    import torch
    from safetensors.torch import load_file, save_file

    from dem_ray.config import parse_config
    from dem_ray.models.tiny import synthetic_corpus, write_jsonl
    from dem_ray.pipeline import Pipeline
    from dem_ray.stages.finetune import FinetuneStage

    data = {s: write_jsonl(root / f"{s}.jsonl", synthetic_corpus(s, 120, seed=1))
            for s in ("numbers", "letters", "code")}  # fmt: skip
    raw = {
        "run_dir": str(root / "run"),
        "base_model": {"dir": str(base)},
        "datasets": {n: {"path": str(p), "validation_fraction": 0.2} for n, p in data.items()},
        "finetune": {"seq_len": 64},
        "search": {"num_trials": 2, "max_concurrent": 1},
        "evaluator": {"max_validation_sequences": 2, "cpus_per_actor": 1},
    }
    config = root / "config.yaml"
    config.write_text(json.dumps(raw))
    pipeline = Pipeline(parse_config(raw, source=str(config)))
    pipeline.open()
    try:
        pipeline.run_command("prepare")
        weights = load_file(base / "model.safetensors")
        steps = {s.key: s for s in FinetuneStage().steps(pipeline.ctx)}
        for i, name in enumerate(pipeline.names):
            out = pipeline.layout.finetune(name)
            shutil.copytree(base, out, dirs_exist_ok=True)
            gen = torch.Generator().manual_seed(i)
            moved = {k: v + 1e-3 * torch.randn(v.shape, generator=gen) for k, v in weights.items()}
            save_file(moved, out / "model.safetensors", metadata={"format": "pt"})
            pipeline.ctx.record(steps[f"finetune/{name}"], [out])
        for command in ("vectors", "search", "merge", "report"):
            pipeline.run_command(command)
    finally:
        pipeline.close()
    return config


def noop(config: Path, verify: bool) -> dict:
    args = ["run", str(config), *(["--verify"] if verify else [])]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    done = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True,
                          env=env, check=False)  # fmt: skip
    figures = json.loads(done.stderr.strip().splitlines()[-1])
    if figures["code"] != 0 or "stages run: none" not in done.stdout:
        raise SystemExit(f"the no-op run ran something or failed:\n{done.stdout}\n{done.stderr}")
    return figures


def main() -> None:
    p = c.parser(__doc__.splitlines()[0], default_repeats="3")
    args = p.parse_args()
    c.setup(args, tiny_repeats=3, smollm2_repeats=3)
    import ray

    root = (args.cache_dir / f"noop-run-{args.size}").resolve()
    config = root / "config.yaml"
    if not (root / ".complete").exists():  # built in place: its config names its own paths
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        base = c.base_dir(args.size, args.cache_dir, root)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            with c.stdout_to_stderr():  # Tune's tables; stdout keeps only the figures
                build_run(base, root)
        finally:
            ray.shutdown()
        (root / ".complete").write_text("ok\n")
    artifacts = sum(p.stat().st_size for p in (root / "run").rglob("*") if p.is_file())
    noop(config, verify=False)  # warm-up: the page cache holds the run either way
    rows = {"default": [], "--verify": []}
    for _ in range(args.repeats):
        for label in rows:
            rows[label].append(noop(config, verify=label == "--verify"))
    med = {
        label: {k: c.median([r[k] for r in runs]) for k in ("seconds", "rchar", "hashed")}
        for label, runs in rows.items()
    }
    print(f"no-op `dem-ray run` on a finished {args.size} run dir "
          f"({c.human_bytes(artifacts)} of artifacts), median of {args.repeats}:")  # fmt: skip
    print(
        c.table(
            ["", "seconds", "bytes read (rchar)", "bytes hashed"],
            [
                [label, m["seconds"], c.human_bytes(m["rchar"]), c.human_bytes(m["hashed"])]
                for label, m in med.items()
            ],  # fmt: skip
        )
    )
    print(f"--verify / default: {c.ratio(med['--verify']['seconds'], med['default']['seconds']):.1f}x "
          f"the time, {c.ratio(med['--verify']['rchar'], med['default']['rchar']):.1f}x the bytes read")  # fmt: skip
    c.write_json(args.json, {"artifacts_bytes": artifacts, "runs": rows, "median": med})


if __name__ == "__main__":
    main()
