"""``acert certify``: its arguments, its command and the printed metrics (also ``acert train``'s).

Kept out of :mod:`acert.cli` so that the certify options (bounds, best-of, attack radii,
float64 re-check) have room without growing the entry point.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from acert.foundation.errors import AcertError

__all__ = ["add_certify_parser", "cmd_certify", "print_evaluation", "unsound_line"]

BOUND_HELP = (
    "ibp, crown-ibp or crown; best: per sample the largest radius of all of them; "
    "best:ibp,crown: of those named"
)


def add_certify_parser(sub: argparse._SubParsersAction) -> None:
    """The ``certify`` subcommand and its options."""
    certify = sub.add_parser("certify", help="certified radii, ACR and accuracies of a trained run")
    certify.add_argument("run", help="run folder or checkpoint")
    certify.add_argument("--bound", default="ibp", help=BOUND_HELP)
    certify.add_argument(
        "--cascade",
        action="store_true",
        help="with a best-of --bound, search each later bound only on the samples the earlier "
        "ones leave below the cap, from the radius they reached (same radii, far cheaper)",
    )
    certify.add_argument("--eps", type=float, nargs="+", help="eps values for certified accuracy")
    certify.add_argument("--eps-max", type=float, help="cap of the radius search and the ACR")
    certify.add_argument("--dataset", help="dataset (default: the run's)")
    certify.add_argument("--data-dir", help="folder holding the dataset files")
    certify.add_argument("--split", default="test", help="train or test")
    certify.add_argument(
        "--limit", type=int, help="certify a stratified subset of this many inputs"
    )
    certify.add_argument(
        "--eval-seed",
        type=int,
        help="seed of that subset (default: the run's eval_seed, else its seed); the same "
        "seed certifies every run on the same images",
    )
    certify.add_argument("--pgd-steps", type=int, default=20, help="PGD steps (0: skip PGD)")
    certify.add_argument("--batch-size", type=int, default=256)
    certify.add_argument("--device", default="cpu")
    certify.add_argument("--out", help="JSON file to write (default: in the run folder)")
    certify.add_argument("--quiet", action="store_true")
    certify.add_argument(
        "--check-float64",
        action="store_true",
        help="re-check every reported radius in float64 (exit status 1 if any fails)",
    )
    certify.add_argument(
        "--crown-memory-mib", type=float, help="cap of each CROWN backward chunk (MiB)"
    )
    attack = certify.add_argument_group(
        "attack radii",
        "per sample the smallest eps at which PGD flips the prediction, an upper bound beside "
        "every certified radius (exit status 1 if one lies below it)",
    )
    attack.add_argument("--attack", action="store_true", help="find the attack radii")
    attack.add_argument("--attack-steps", type=int, metavar="N", help="PGD steps (20)")
    attack.add_argument("--attack-restarts", type=int, metavar="N", help="random starts (3)")
    attack.add_argument(
        "--attack-iterations", type=int, metavar="N", help="bisection steps on eps (10)"
    )
    certify.set_defaults(handler=cmd_certify)


def _attack_search(args: argparse.Namespace):
    """The attack settings the flags ask for, or None without ``--attack``."""
    from acert.radius.attacks import AttackSearch

    given = {
        name: getattr(args, f"attack_{name}")
        for name in ("steps", "restarts", "iterations")
        if getattr(args, f"attack_{name}") is not None
    }
    if not args.attack:
        if given:
            flag = "--attack-" + next(iter(given))
            raise AcertError(f"{flag} only applies to attack radii; add --attack")
        return None
    return AttackSearch(**given)


def cmd_certify(args: argparse.Namespace) -> int:
    """Certify a run, print the metrics; exit status 1 when a check finds a bad certificate."""
    from acert.workflows.certify.runs import (
        CertificateChecks,
        DataSelection,
        certify_run,
        run_settings,
    )

    settings = run_settings(
        args.run,
        bound=args.bound,
        eps=args.eps,
        eps_max=args.eps_max,
        pgd_steps=args.pgd_steps,
        batch_size=args.batch_size,
        crown_memory_mib=args.crown_memory_mib,
        cascade=args.cascade,
    )
    data = DataSelection(args.dataset, args.data_dir, args.split, args.limit, args.eval_seed)
    checks = CertificateChecks(float64=args.check_float64, attack=_attack_search(args))
    result = certify_run(
        args.run,
        settings,
        data,
        checks=checks,
        device=args.device,
        out=args.out,
        progress=not args.quiet,
    )
    metrics = result.metrics
    print_evaluation(metrics)
    check = metrics.get("float64_check")
    if check is not None:
        print(
            f"  float64 re-check          {check['violations']} of {check['checked']} "
            f"certificates fail in float64"
            + (f": samples {check['violating_samples'][:20]}" if check["violations"] else "")
        )
    print(f"written: {result.path}")
    unsound = unsound_line(metrics, result.path)
    if unsound:
        print(unsound, file=sys.stderr)
    failed = (check is not None and check["violations"]) or unsound
    return 1 if failed else 0


def unsound_line(metrics: dict[str, Any], path: object) -> str:
    """The error line for attack radii below certified radii (empty when there are none)."""
    check = metrics.get("attack_check")
    if not check or not check["violations"]:
        return ""
    worst = check["worst"]
    return (
        f"acert: error: UNSOUND: {check['violations']} of {metrics['n']} samples have an attack "
        f"radius below their certified radius (worst: sample {worst['sample']}, certified "
        f"{worst['certified']:.6g} > attack {worst['attack']:.6g}): an unsound {metrics['bound']} "
        f"certificate or a wrong attack; the samples are listed in {path} (attack_check)"
    )


def describe_arithmetic(record: dict[str, Any]) -> str:
    """What a certificate covers, in words (:func:`acert.bounds.arithmetic.arithmetic_record`)."""
    return (
        f"{record['dtype']} on {record['device']}, IEEE (no TF32, no autocast), "
        f"{'flush-to-zero' if record['flush_to_zero'] else 'gradual underflow'}"
    )


def print_evaluation(metrics: dict[str, Any]) -> None:
    """The metrics of an evaluation (``acert train``) or certification, one per line."""
    acr = f"{metrics['acr']:.5f} ({metrics['acr_percent_of_eps_max']:.1f}% of eps_max)"
    rows = [
        ("samples", f"{metrics['n']}"),
        ("bound", metrics["bound"]),
        ("clean accuracy", f"{100 * metrics['clean_accuracy']:.2f}%"),
    ]
    if "acr_attack" in metrics:
        attack = metrics["acr_attack"]
        rows += [
            ("ACR (certified)", acr),
            ("ACR (attack)", f"{attack:.5f} ({100 * attack / metrics['eps_max']:.1f}% of eps_max)"),
            ("ACR gap", f"{metrics['acr_gap']:.5f} (attack - certified)"),
        ]
    else:
        rows.append(("ACR", acr))
    rows += [("eps_max", f"{metrics['eps_max']:.6g}"), ("acceps", f"{metrics['acceps']:.4f}")]
    best = metrics.get("best_of")
    if best:
        rows.append(("ACR per bound", ", ".join(f"{b} {v:.5f}" for b, v in best["acr"].items())))
        rows.append(("best radius from", ", ".join(f"{b} {n}" for b, n in best["won"].items())))
    rows += [
        (f"certified acc @ {eps}", f"{100 * v:.2f}%")
        for eps, v in metrics["certified_accuracy"].items()
    ]
    rows += [(f"PGD acc @ {eps}", f"{100 * v:.2f}%") for eps, v in metrics["pgd_accuracy"].items()]
    rows.append(("bound evals / sample", f"{metrics['radius_evaluations_per_sample']:.2f}"))
    if "arithmetic" in metrics:
        rows.append(("arithmetic", describe_arithmetic(metrics["arithmetic"])))
    check = metrics.get("attack_check")
    if check:
        rows.append(
            (
                "attack check",
                f"{check['violations']} of {metrics['n']} attack radii below the certified "
                f"(PGD {check['steps']} steps x {check['restarts']} starts, "
                f"{check['iterations']} bisections)",
            )
        )
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
