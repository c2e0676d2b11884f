"""The `dem-ray` command."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys

from dem_ray.config import ConfigError, load_config
from dem_ray.core.merge import MergeError
from dem_ray.core.spaces import SpaceError
from dem_ray.core.vectors import VectorError
from dem_ray.data.readers import DataError
from dem_ray.models.base import ModelError
from dem_ray.run.console import DATE_FORMAT, LOG_FORMAT, Console, new_log_dir
from dem_ray.run.storage import StorageError

log = logging.getLogger("dem_ray.cli")

USER_ERRORS = (
    ConfigError, DataError, ModelError, VectorError, SpaceError, MergeError, StorageError,
)  # fmt: skip


VERBOSE_HELP = ("also show Ray's and the workers' output, which by default goes to "
                "RUN_DIR/logs/ only")  # fmt: skip
STATUS_HELP = "what a run would do now: each step done, stale (and why), missing or running"
PLAN_HELP = ("the memory each fine-tune worker and evaluator actor will need, and whether the "
             "GPUs (accelerator_type, --gpu-memory) or the nodes' RAM hold it")  # fmt: skip


def stage_help() -> dict[str, str]:
    from dem_ray.stages import COMMANDS

    return {"run": "every stage, skipping those already done", **COMMANDS}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dem-ray",
        description="Distribution-Edited Models on Ray: fine-tune once per dataset, "
        "then search the mixture of distribution vectors by validation perplexity.",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in stage_help().items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("config", help="run config YAML")
        p.add_argument("--force", action="store_true", help="run even if up to date")
        p.add_argument(
            "--verify",
            action="store_true",
            help="re-hash every recorded output instead of trusting unchanged sizes and times",
        )
        p.add_argument("--ray-address", help="Ray cluster to join (default: RAY_ADDRESS or local)")
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help=VERBOSE_HELP)  # fmt: skip
        if name == "merge":
            p.add_argument(
                "--weights", help="explicit weights, e.g. code=0.6,chat=0.4 (default: the best)"
            )
    status = sub.add_parser(
        "status",
        help=STATUS_HELP,
        description=STATUS_HELP + "; starts no Ray, writes nothing",
    )
    status.add_argument("config", help="run config YAML")
    status.add_argument("--json", action="store_true", help="the same answer as JSON")
    plan = sub.add_parser(
        "plan", help=PLAN_HELP, description=PLAN_HELP + "; reads no weights, writes nothing"
    )
    plan.add_argument("config", help="run config YAML")
    plan.add_argument(
        "--gpu-memory",
        type=float,
        metavar="GIB",
        help="memory of one GPU in GiB, where no accelerator_type names it (or to override it)",
    )
    plan.add_argument(
        "--ray-address",
        help="compare with the nodes of this running cluster (default: RAY_ADDRESS if set, "
        "else this machine's RAM for CPU work)",
    )
    plan.add_argument("--json", action="store_true", help="the same answer as JSON")
    corpora = sub.add_parser("corpora", help="example datasets from text that packages ship")
    corpora_sub = corpora.add_subparsers(dest="corpora_command", required=True)
    build = corpora_sub.add_parser("build", help="write NAME.train.jsonl / NAME.val.jsonl")
    build.add_argument("names", nargs="+")
    build.add_argument("--out", required=True)
    build.add_argument("--max-docs", type=int, default=None)
    build.add_argument("--validation-fraction", type=float, default=0.05)
    build.add_argument("--seed", type=int, default=0)
    build.add_argument(
        "--cloze",
        type=int,
        default=0,
        metavar="N",
        help="also hold out N rows per corpus as an lm-eval multiple-choice cloze task "
        "(OUT/cloze/cloze_NAME.yaml); needs at least 2 corpora",
    )
    build.add_argument(
        "--cloze-choices",
        type=int,
        default=4,
        metavar="K",
        help="choices per cloze item: the true continuation and K-1 from other corpora",
    )
    corpora_sub.add_parser("list", help="the corpora this installation can build")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("corpora", "status", "plan"):  # a stage command's console sets up its own
        logging.basicConfig(
            level=logging.WARNING if args.quiet else logging.INFO,
            format=LOG_FORMAT,
            datefmt=DATE_FORMAT,
        )
    # Optuna logs every study it creates at INFO (the sampler's, the exported one): noise.
    logging.getLogger("optuna").setLevel(logging.WARNING)
    try:
        if args.command == "corpora":
            return _corpora(args)
        if args.command == "status":
            return _status(args)
        if args.command == "plan":
            return _plan(args)
        return _stages(args)
    except USER_ERRORS as exc:
        print(f"dem-ray: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from dem_ray.ray.evaluator import EvaluatorMemoryError
        from dem_ray.run.lock import RunDirBusy
        from dem_ray.stages import StageError

        if isinstance(exc, EvaluatorMemoryError):
            print(f"dem-ray: error: {exc}", file=sys.stderr)
            return 2
        if isinstance(exc, StageError | RunDirBusy):
            print(f"dem-ray: error: {exc}", file=sys.stderr)
            return 1
        raise


def _stages(args) -> int:
    import signal

    from dem_ray.run.stopping import (
        as_stopped,
        exit_stopped,
        install_stop_handlers,
        uninstall_stop_handlers,
    )

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    install_stop_handlers()
    try:
        return _run_stages(args, load_config(args.config))
    except KeyboardInterrupt as exc:  # Stopped, or Ray's re-raise of it
        stop = as_stopped(exc)
        exit_stopped(stop, f"dem-ray: stopped by {stop.name}; what finished is kept, and "
                           f"`dem-ray run {args.config}` carries on from there")  # fmt: skip
        raise  # not reached: exit_stopped exits
    finally:
        uninstall_stop_handlers(saved)  # a caller's own handlers (a test process)


def _run_stages(args, config) -> int:
    from dem_ray.pipeline import Pipeline
    from dem_ray.stages import COMMANDS

    pipeline = Pipeline(config, ray_address=args.ray_address, verify=args.verify)
    # One folder per command: a bucket run dir's logs from several machines never collide.
    logs = new_log_dir(pipeline.layout.logs, args.command)
    console = Console(logs, verbose=args.verbose, quiet=args.quiet)
    console.open(header=f"dem-ray {args.command} {args.config}")
    try:
        log.info("logs: %s%s", pipeline.show(logs),
                 "" if args.verbose else " (-v shows Ray's and the workers' output here too)")  # fmt: skip
        # Keep stdout for what the command answers: stray prints go to the logs.
        with contextlib.redirect_stdout(console.stdout_sink):
            if args.command == "run":
                pipeline.run(tuple(COMMANDS), force=args.force)
            elif args.command == "merge" and args.weights:
                pipeline.run(("merge",), force=True, weights=_parse_weights(args.weights))
            else:
                pipeline.run((args.command,), force=args.force)
    finally:
        # fd 2 stays on driver.log: Ray's C++ side still writes while the process exits.
        console.close(restore_fd=False)
        try:
            pipeline.storage.push([logs])
        except Exception as exc:  # noqa: BLE001 - the run's own outcome is what to report
            log.warning("could not upload %s: %s", pipeline.show(logs), exc)
    print(f"stages run: {', '.join(pipeline.ran) or 'none'}")
    print(f"stages skipped (up to date): {', '.join(pipeline.skipped) or 'none'}")
    if args.command in ("run", "report"):
        _print_summary(pipeline)
    return 0


def _status(args) -> int:
    import json

    from dem_ray.status import render, run_status

    config = load_config(args.config)
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the answer
        status = run_status(config)
    print(json.dumps(status.as_dict(), indent=2) if args.json else render(status))
    return 0


def _plan(args) -> int:
    """Exit 1 when a worker or actor clearly does not fit (what `run` would refuse)."""
    import os

    from dem_ray import plan

    config = load_config(args.config)
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the answer
        shape = plan.shape_of_run(config)
        address = args.ray_address or os.environ.get("RAY_ADDRESS")
        nodes = plan.cluster_nodes(address) if address else None
    answer = plan.build_plan(config, shape, gpu_memory_gib=args.gpu_memory, nodes=nodes,
                             local_ram=None if nodes else plan.local_ram())  # fmt: skip
    print(plan.dumps(answer) if args.json else plan.render(answer))
    return 1 if any(check.refused for check in answer.checks) else 0


def _parse_weights(text: str) -> dict[str, float]:
    weights = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        try:
            if not sep:
                raise ValueError
            weights[name.strip()] = float(value)
        except ValueError:
            raise MergeError(f"--weights: '{part}' is not NAME=NUMBER") from None
    return weights


def _print_summary(pipeline) -> None:
    from dem_ray.report.render import (
        downstream_line,
        downstream_table,
        ppl_table,
        throughput_lines,
        tokens_note,
    )

    report = pipeline.report()
    for split in ("validation", "test"):
        print()
        print(f"{split} perplexity (lower is better):")
        _print_rows(ppl_table(report, split=split))
    if tokens_note(report):
        print(tokens_note(report))
    rows = downstream_table(report)
    if rows:
        print()
        print(f"downstream tasks: {downstream_line(report)}")
        _print_rows(rows)
    print()
    print(report["summary"])
    for line in throughput_lines(report):
        print(line)
    weights = ", ".join(f"{k}={v:.3f}" for k, v in report["dem_weights"].items())
    print(f"merged weights: {weights}")
    if report["dem_weights"] != report["best_weights"]:
        best = ", ".join(f"{k}={v:.3f}" for k, v in report["best_weights"].items())
        why = ("the downstream rerank chose the merged weights"
               if report.get("weights_source") == "rerank"
               else "the merged model has the weights you gave")  # fmt: skip
        print(f"search's best:  {best} ({why})")
    print(f"merged model: {report['artifacts']['merged_model']}")
    print(f"report:       {pipeline.show(pipeline.layout.report / 'report.md')}")


def _print_rows(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = (cell.rjust(w) if i else cell.ljust(w)
                 for i, (cell, w) in enumerate(zip(row, widths, strict=True)))  # fmt: skip
        print("  " + "  ".join(cells))


def _corpora(args) -> int:
    from dem_ray.data import corpora

    if args.corpora_command == "list":
        width = max(map(len, corpora.CORPORA))
        fmt_width = max(len(info.format) for info in corpora.CORPORA.values())
        for name, info in corpora.CORPORA.items():
            needs = f" (needs: {info.install})" if info.install else ""
            print(f"{name:<{width}}  {info.format:<{fmt_width}}  {info.description}{needs}")
        return 0
    try:
        paths = corpora.build(
            args.names,
            args.out,
            max_docs=args.max_docs,
            validation_fraction=args.validation_fraction,
            seed=args.seed,
            cloze=args.cloze,
            cloze_choices=args.cloze_choices,
        )
    except (ValueError, corpora.CorpusUnavailable) as exc:
        print(f"dem-ray: error: {exc}", file=sys.stderr)
        return 2
    for name, splits in paths.items():
        print(f"{name}: {splits['train']} {splits['validation']}")
        if "cloze" in splits:
            print(f"{name} cloze task: {splits['cloze']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
