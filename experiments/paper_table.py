"""The tables of docs/RESULTS.md's paper-scale runs (issue 22) from a study folder of
experiments/paper_scale.sh: one row per run, IBP certificates on the whole test set
(certify_ibp.json), PGD at the largest certification radius on the training's evaluation
subset (test_metrics.json) and the training minutes.

usage: python experiments/paper_table.py experiments/results/paper-scale-mnist
"""

from __future__ import annotations

import json
import sys
from fractions import Fraction
from pathlib import Path


def _eps_text(eps: float) -> str:
    """0.1 as 0.1, 8.8/255 as 8.8/255."""
    as_255 = Fraction(eps * 255).limit_denominator(10)
    if eps < 0.05 and as_255.denominator in (1, 5, 10):
        return f"{float(as_255):g}/255"
    return f"{eps:g}"


def _point(run: Path) -> str:
    """``ACERT κ = 0`` or ``IBP ε_train = 8.8/255`` from the run's config."""
    config = {}
    for line in (run / "config.yaml").read_text().splitlines():
        key, _, value = line.partition(":")
        config[key.strip()] = value.strip()
    if config["method"] == "acert":
        return f"ACERT κ = {float(config['kappa']):g}"
    return f"{config['method'].upper()} ε_train = {_eps_text(float(config['eps_train']))}"


def main(folder: str) -> None:
    runs = [r for r in sorted(Path(folder).iterdir()) if (r / "certify_ibp.json").is_file()]
    if not runs:
        raise SystemExit(f"{folder}: no run with certify_ibp.json yet")
    first = json.loads((runs[0] / "certify_ibp.json").read_text())
    radii = list(first["certified_accuracy"])
    eps_max = _eps_text(first["eps_max"])
    attacked = max(radii, key=float)  # PGD runs at the certification radii
    header = [
        "method",
        "clean %",
        "ACR, IBP",
        *(f"cert {_eps_text(float(e))}" for e in radii),
        f"PGD {_eps_text(float(attacked))} (subset)",
        "training min",
    ]
    print("| " + " | ".join(header) + " |")
    print("|---|" + "---:|" * (len(header) - 1))
    for run in runs:
        cert = json.loads((run / "certify_ibp.json").read_text())
        train = json.loads((run / "test_metrics.json").read_text())
        pgd = train["pgd_accuracy"].get(attacked)
        cells = [
            _point(run),
            f"{100 * cert['clean_accuracy']:.2f}",
            f"{cert['acr_percent_of_eps_max']:.1f}",
            *(f"{100 * cert['certified_accuracy'][e]:.1f}" for e in radii),
            "–" if pgd is None else f"{100 * pgd:.1f} ({train['n']:,})",
            f"{train['train_seconds'] / 60:.1f}",
        ]
        print("| " + " | ".join(cells) + " |")
    print(f"\nIBP certificates on {cert['n']:,} test images; ACR in % of ε_max = {eps_max}.")


if __name__ == "__main__":
    main(sys.argv[1])
