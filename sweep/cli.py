"""The ``sae-sweep`` command line.

A thin layer: each subcommand parses its arguments and calls one public function of
activation_cache, trainer or sweep. Imports happen inside the handlers so ``sae-sweep --help``
is instant. A :class:`activation_cache.UserError` (bad config, missing file, mismatched cache...)
is printed as one ``error:`` line with exit status 2; Ctrl-C exits with status 130 after the
callee has saved what it had.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

Handler = Callable[[argparse.Namespace], int | None]


# --------------------------------------------------------------------------------------------
# handlers (one per subcommand; each calls a package's public API)
# --------------------------------------------------------------------------------------------


def _cmd_demo(args: argparse.Namespace) -> int | None:
    import shlex

    from sweep import SweepInterrupted, run_demo

    try:
        run_demo(out_dir=args.out, num_samples=args.num_samples,
                 max_concurrent=args.max_concurrent)
    except SweepInterrupted:
        again = ["sae-sweep", "demo", "--out", args.out]
        for flag, value in (("--num-samples", args.num_samples),
                            ("--max-concurrent", args.max_concurrent)):
            if value is not None:
                again += [flag, str(value)]
        print(f"sae-sweep demo: interrupted; continue it with: {shlex.join(again)}",
              file=sys.stderr)
        return 130
    return 0


def _cmd_cache(args: argparse.Namespace) -> int | None:
    from activation_cache import CacheConfig, build_cache

    from .console import configure_logging

    configure_logging("activation_cache")  # progress notes and the closing summary
    cfg = CacheConfig.from_yaml(args.config)
    _use_threads(args.threads)
    build_cache(cfg, overwrite=args.overwrite, num_workers=args.workers, address=args.address)
    return 0


def _cmd_train(args: argparse.Namespace) -> int | None:
    from trainer import train_from_yaml

    _use_threads(args.threads)
    train_from_yaml(args.config, out_dir=args.out, resume=not args.no_resume)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int | None:
    from trainer import evaluate_sae_dir

    evaluate_sae_dir(
        args.sae_dir, cache=args.cache, split=args.split, max_tokens=args.max_tokens,
        output_format=args.format,
    )
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int | None:
    from sweep import SweepConfig, SweepInterrupted, resume_sweep, run_sweep, summarize_sweep

    options = dict(address=args.address, verbose=args.verbose, take_over=args.take_over)
    try:
        if args.resume:
            if args.config:
                raise _usage("give CONFIG.yaml or --resume EXPERIMENT_DIR, not both")
            experiment = args.resume
            resume_sweep(args.resume, **options)
        else:
            if not args.config:
                raise _usage("sweep needs CONFIG.yaml or --resume EXPERIMENT_DIR")
            experiment = str(SweepConfig.from_yaml(args.config).experiment_path)
            run_sweep(args.config, **options)
    except SweepInterrupted as stop:
        _say(summarize_sweep(stop.experiment_dir, interrupted=True,
                             resume_command=stop.resume_command, stream=sys.stdout))
        print(f"sae-sweep sweep: interrupted; continue it with: {stop.resume_command}",
              file=sys.stderr, flush=True)
        return 130
    _say(summarize_sweep(experiment, stream=sys.stdout))
    return 0


def _cmd_best(args: argparse.Namespace) -> int | None:
    from sweep import print_best

    from .console import configure_logging

    configure_logging()  # its warning (ranking on a test_* metric) goes to stderr
    if args.per_hook:
        from .suite_results import print_per_hook

        print_per_hook(args.experiment_dir, hook=args.hook)
        return 0
    where = args.where
    if args.hook:  # --hook H: the rows of H (a name or a pattern) among the table's hooks
        from .results import load_results, load_sweep_info
        from .suite_results import HOOK_COLUMN, select_hooks

        frame = load_results(args.experiment_dir)
        hooks = select_hooks(frame, args.hook, load_sweep_info(args.experiment_dir))
        if HOOK_COLUMN in frame:
            clause = f"`{HOOK_COLUMN}` in {hooks!r}"
            where = f"({where}) and {clause}" if where else clause
    print_best(
        args.experiment_dir, metric=args.metric, mode=args.mode, where=where, top=args.top,
        pareto=args.pareto, output_format=args.format, all_columns=args.all_columns,
        per_architecture=args.per_architecture, per_trial=args.per_trial,
    )
    return 0


def _cmd_export(args: argparse.Namespace) -> int | None:
    from sweep import export_trial

    from .console import configure_logging

    configure_logging()
    if args.release:
        from .release import export_release

        if args.out:
            raise _usage("export: give --out (one trial) or --release (every hook), not both")
        export_release(args.experiment_dir, out_dir=args.release)
        return 0
    if not args.out:
        raise _usage("export: --out OUT is required (or --release OUT for a suite)")
    export_trial(args.experiment_dir, trial=args.trial, out_dir=args.out, output_format=args.format)
    return 0


def _cmd_report(args: argparse.Namespace) -> int | None:
    from sweep import write_report

    from .console import configure_logging

    configure_logging()
    write_report(args.experiment_dir, out_dir=args.out, top=args.top)
    return 0


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask; all cores where unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def _use_threads(threads: int | None) -> int:
    """Run torch's intra-op pool (and the tokenizers' pool) on ``threads`` threads (default:
    the cores available to the process); return the number."""
    n = threads or available_cores()
    os.environ.setdefault("RAYON_NUM_THREADS", str(n))  # HF tokenizers' pool, read on first use
    import torch

    torch.set_num_threads(n)
    return n


def _quiet_libraries() -> None:
    """Keep the libraries' own noise off the console (read by them at import, so set first):
    HF transformers' warnings (errors still show), and, when stderr is not a terminal, their
    progress bars (HF's, and any tqdm a library draws without asking), which would write
    carriage returns into a log file. Our own progress goes through
    ``activation_cache.progress_bar``, which writes plain lines off a terminal."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        terminal = sys.stderr.isatty()
    except (AttributeError, ValueError):
        terminal = False
    if not terminal:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TQDM_DISABLE", "1")


def _say(text: str) -> None:
    """The one place a command prints its summary (stdout; errors go to stderr)."""
    print(text, flush=True)


# --------------------------------------------------------------------------------------------
# parser
# --------------------------------------------------------------------------------------------


class _UsageError(Exception):
    pass


def _usage(message: str) -> _UsageError:
    return _UsageError(message)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


_THREADS_HELP = ("CPU threads for torch (default: the cores available to this process); "
                 "give each of two jobs sharing a machine half of its cores")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sae-sweep",
        description="Cache a model's activations once, sweep sparse autoencoders over them on a "
        "Ray cluster with Optuna, query the best trials and export the winner (SAELens format).",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, handler: Handler, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(handler=handler)
        return sp

    sp = add("demo", _cmd_demo, "the main job on the embedded default: cache SmolLM2 activations "
             "on the built-in Shakespeare corpus, run a small Optuna sweep on local Ray, print the "
             "best trials, export the winner (SAELens format) and write the report plots")
    sp.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    sp.add_argument("--num-samples", type=int, default=None, help="number of trials")
    sp.add_argument("--max-concurrent", type=int, default=None, help="concurrent trials")

    sp = add("cache", _cmd_cache, "build (or resume building) an activation cache from CONFIG.yaml")
    sp.add_argument("config", help="cache config YAML")
    sp.add_argument("--overwrite", action="store_true",
                    help="replace an existing cache built with a different config")
    sp.add_argument("--workers", type=int, default=1,
                    help="split the corpus over this many Ray workers (default 1: in process)")
    sp.add_argument("--address", default=None, help="Ray cluster address for --workers > 1")
    sp.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                    help=_THREADS_HELP)

    sp = add("train", _cmd_train, "train one SAE from a cache (CONFIG.yaml: cache, sae, training)")
    sp.add_argument("config", help="training job YAML")
    sp.add_argument("--out", default=None, help="output folder (overrides the config's)")
    sp.add_argument("--no-resume", action="store_true",
                    help="start over even if the output folder holds a checkpoint")
    sp.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                    help=_THREADS_HELP)

    sp = add("eval", _cmd_eval, "evaluate a saved SAE on a cache's held-out test split")
    sp.add_argument("sae_dir", help="a folder written by train/export (native format)")
    sp.add_argument("--cache", required=True, help="activation cache path or URI")
    sp.add_argument("--split", default=None, choices=["train", "val", "test"],
                    help="which split (default: test, the figures nothing was tuned on; val for "
                         "a cache without a test split)")
    sp.add_argument("--max-tokens", type=int, default=None)
    sp.add_argument("--format", default="table", choices=["table", "json"])

    sp = add("sweep", _cmd_sweep, "run an Optuna-guided Ray Tune sweep (or resume one)")
    sp.add_argument("config", nargs="?", help="sweep config YAML")
    sp.add_argument("--resume", metavar="EXPERIMENT_DIR", default=None,
                    help="continue a sweep whose driver stopped")
    sp.add_argument("--address", default=None,
                    help="Ray address: 'auto' or HOST:PORT of an existing cluster "
                    "(default: start a local Ray)")
    sp.add_argument("--verbose", action="store_true",
                    help="show Ray's own output (trial tables, result boxes, INFO lines, the "
                    "trials' output) on the console; by default it goes to "
                    "EXPERIMENT_DIR/sweep.log and the console shows one line per trial event")
    sp.add_argument("--take-over", action="store_true",
                    help="replace the experiment's lock when it names a driver on another host "
                    "(which cannot be checked from here); only once that driver is gone")

    sp = add("best", _cmd_best, "print the best trials (or the Pareto front) of a sweep")
    sp.add_argument("experiment_dir")
    sp.add_argument("--metric", default=None, help="default: the sweep's objective")
    sp.add_argument("--mode", default=None, choices=["min", "max"])
    sp.add_argument("--where", default=None, help='a pandas query, e.g. "l0 <= 64"')
    sp.add_argument("--top", type=_positive_int, default=5)
    sp.add_argument("--pareto", action="store_true", help="print the Pareto front instead")
    sp.add_argument("--per-architecture", action="store_true",
                    help="per architecture: trials run, how many met the sweep's constraints, "
                    "and the best of each")
    sp.add_argument("--per-hook", action="store_true",
                    help="a suite: the winner of every hook (the sweep's objective and "
                    "constraints) with its test figures")
    sp.add_argument("--hook", default=None, metavar="HOOK",
                    help="only the trials of HOOK (a name or a pattern such as "
                    "'blocks.{6,12}.hook_resid_post')")
    sp.add_argument("--per-trial", action="store_true",
                    help="with replicates (a confirm stage), rank single trials instead of "
                    "configurations on their seed means")
    sp.add_argument("--all-columns", action="store_true",
                    help="show every column (the table fits about 120 characters otherwise)")
    sp.add_argument("--format", default="table", choices=["table", "csv", "json"])

    sp = add("export", _cmd_export, "export a trial's SAE with a README card")
    sp.add_argument("experiment_dir")
    sp.add_argument("--trial", default="best", help="trial id, or 'best' (default)")
    sp.add_argument("--out", default=None, help="output folder")
    sp.add_argument("--format", default="saelens", choices=["native", "saelens"])
    sp.add_argument("--release", default=None, metavar="OUT",
                    help="a suite: the winner of every hook as one SAELens folder each, an "
                    "index (release.yaml) and a release card, in OUT")

    sp = add("report", _cmd_report, "write PNG plots: Pareto fronts and training curves")
    sp.add_argument("experiment_dir")
    sp.add_argument("--out", default=None, help="default: EXPERIMENT_DIR/report")
    sp.add_argument("--top", type=_positive_int, default=5,
                    help="training curves of the top N trials")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from activation_cache import UserError

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    _quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        rc = args.handler(args)
    except _UsageError as exc:
        parser.error(str(exc))  # exits 2
    except UserError as exc:
        print(f"sae-sweep {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        detail = f"; {exc}" if str(exc) else ""
        print(f"sae-sweep {args.command}: interrupted; progress so far is saved{detail}",
              file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
