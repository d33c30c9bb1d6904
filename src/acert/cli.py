"""The ``acert`` command: argparse subcommands, each a thin call into the library.

Every user error is an :class:`~acert.errors.AcertError`, printed as one line
(``acert: error: ...``) with exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from acert.errors import AcertError

__all__ = ["main"]

CONFIG_HELP = {
    "dataset": "dataset name (see `acert list`)",
    "data_dir": "folder holding the dataset files",
    "train_limit": "train on a stratified, seeded subset of this many training images",
    "val_size": "validation images carved from the training split (0: select the last epoch)",
    "model": "architecture (see `acert list`)",
    "method": "training method (see `acert list`)",
    "kappa": "ACERT/IBP weight of the clean loss, the trade-off knob",
    "eps_max": "training cap and ACR cap, pixel units",
    "eps_train": "fixed training eps of the IBP-family baselines",
    "epochs": "training epochs",
    "batch_size": "batch size",
    "lr": "Adam learning rate (OneCycle peak)",
    "reg_epochs": "epochs of the eps ramp and warm-up regularisers",
    "cert_eps": "comma-separated eps values for certified accuracy",
    "eval_bound": "bound of the final evaluation: ibp, crown-ibp or crown",
    "device": "cpu, cuda or cuda:N",
    "out": "run folder",
}


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    from acert.config import TrainConfig

    for item in dataclasses.fields(TrainConfig):
        flag = "--" + item.name.replace("_", "-")
        parser.add_argument(
            flag,
            dest=f"cfg_{item.name}",
            default=None,
            metavar="V",
            help=CONFIG_HELP.get(item.name, argparse.SUPPRESS),
        )


def _config_from_args(args: argparse.Namespace):
    from acert.config import config_from_dict, load_yaml, parse_override

    values: dict[str, Any] = load_yaml(args.config) if args.config else {}
    for text in args.set or []:
        key, value = parse_override(text)
        values[key] = value
    for key, value in vars(args).items():
        if key.startswith("cfg_") and value is not None:
            values[key[4:]] = parse_override(f"x={value}")[1]
    return config_from_dict(values)


def _default_out(config) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config.dataset}-{config.method}-{stamp}"


def cmd_train(args: argparse.Namespace) -> int:
    from acert.train import run

    config = _config_from_args(args)
    out = Path(config.out) if config.out else _default_out(config)
    config = dataclasses.replace(config, out=str(out))
    print(f"acert train: {config.method} on {config.dataset} -> {out}", flush=True)
    try:
        result = run(config, out=out, resume=args.resume, progress=not args.quiet)
    except KeyboardInterrupt:
        print(f"\ninterrupted; continue with: acert train --out {out} --resume", file=sys.stderr)
        return 130
    _print_evaluation(result.test.to_dict())
    print(f"run folder: {out}")
    return 0


def _print_evaluation(metrics: dict[str, Any]) -> None:
    rows = [
        ("samples", f"{metrics['n']}"),
        ("bound", metrics["bound"]),
        ("clean accuracy", f"{100 * metrics['clean_accuracy']:.2f}%"),
        ("ACR", f"{metrics['acr']:.5f} ({metrics['acr_percent_of_eps_max']:.1f}% of eps_max)"),
        ("eps_max", f"{metrics['eps_max']:.6g}"),
        ("acceps", f"{metrics['acceps']:.4f}"),
    ]
    rows += [
        (f"certified acc @ {eps}", f"{100 * v:.2f}%")
        for eps, v in metrics["certified_accuracy"].items()
    ]
    rows += [(f"PGD acc @ {eps}", f"{100 * v:.2f}%") for eps, v in metrics["pgd_accuracy"].items()]
    rows.append(("bound evals / sample", f"{metrics['radius_evaluations_per_sample']:.2f}"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


def cmd_certify(args: argparse.Namespace) -> int:
    from acert.certify import certify_run

    result = certify_run(
        args.run,
        bound=args.bound,
        eps=args.eps,
        eps_max=args.eps_max,
        dataset=args.dataset,
        data_dir=args.data_dir,
        split=args.split,
        limit=args.limit,
        pgd_steps=args.pgd_steps,
        batch_size=args.batch_size,
        device=args.device,
        out=args.out,
        progress=not args.quiet,
    )
    _print_evaluation(result.metrics)
    print(f"written: {result.path}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from acert.data import DATASETS
    from acert.methods import list_methods
    from acert.models import MODELS

    print("datasets:")
    for name, info in DATASETS.items():
        print(f"  {name:<14} {info.description}")
    print("models:")
    for name, spec in MODELS.items():
        print(f"  {name:<14} {spec.description}")
    print("methods:\n  " + ", ".join(list_methods()))
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from acert.data import download

    print(f"{args.dataset}: {download(args.dataset, args.data_dir)}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="acert", description="Adaptive certified training (ACERT)."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model (default: ACERT on the embedded mnist5k)")
    train.add_argument("--config", help="YAML file of config keys")
    train.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override any config key"
    )
    train.add_argument("--resume", action="store_true", help="continue the run in --out")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_config_flags(train)
    train.set_defaults(handler=cmd_train)

    certify = sub.add_parser("certify", help="certified radii, ACR and accuracies of a trained run")
    certify.add_argument("run", help="run folder or checkpoint")
    certify.add_argument("--bound", default="ibp", help="ibp, crown-ibp or crown")
    certify.add_argument("--eps", type=float, nargs="+", help="eps values for certified accuracy")
    certify.add_argument("--eps-max", type=float, help="cap of the radius search and the ACR")
    certify.add_argument("--dataset", help="dataset (default: the run's)")
    certify.add_argument("--data-dir", help="folder holding the dataset files")
    certify.add_argument("--split", default="test", help="train or test")
    certify.add_argument(
        "--limit", type=int, help="certify a stratified subset of this many inputs"
    )
    certify.add_argument("--pgd-steps", type=int, default=20, help="PGD steps (0: skip PGD)")
    certify.add_argument("--batch-size", type=int, default=256)
    certify.add_argument("--device", default="cpu")
    certify.add_argument("--out", help="JSON file to write (default: in the run folder)")
    certify.add_argument("--quiet", action="store_true")
    certify.set_defaults(handler=cmd_certify)

    listing = sub.add_parser("list", help="datasets, models and methods")
    listing.set_defaults(handler=cmd_list)

    download = sub.add_parser("download", help="fetch a dataset's standard files (needs internet)")
    download.add_argument("dataset")
    download.add_argument("--data-dir")
    download.set_defaults(handler=cmd_download)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``acert`` console script."""
    args = _parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except AcertError as err:
        print(f"acert: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
