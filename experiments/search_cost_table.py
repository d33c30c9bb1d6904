"""The table of docs/PERFORMANCE.md, "The training search: cost against benefit".

Per training search and κ: the final models' clean accuracy and ACR (% of ε_max, IBP, 1,000 test
digits) as mean [lowest, highest] over seeds, whether the ranges overlap the specification's,
and the cost during training: radius evaluations per sample and seconds per epoch at the full
ε (epochs after the ramp, from each run's metrics.csv), the latter also over the IBP runs at
ε_train = ε_max of the same study. Those epoch times come from runs that shared the machine with
another study, so the ratio is indicative; experiments/search_cost_timing.py measures it in one
process.

usage: python experiments/search_cost_table.py TRADEOFF_STUDY SEARCH_COST_STUDY
"""

from __future__ import annotations

import csv
import statistics
import sys
from pathlib import Path

from acert.records.seeds import SeedPoint, seed_points
from acert.records.study import study_table


def full_eps_epochs(run: Path) -> tuple[list[float], list[float]]:
    """Seconds and radius evaluations per sample of the epochs at the final training ε."""
    with open(run / "metrics.csv") as stream:
        rows = list(csv.DictReader(stream))
    final = max(float(r["eps"] or 0) for r in rows)
    full = [r for r in rows if float(r["eps"] or 0) >= final * (1 - 1e-9)]
    seconds = [float(r["epoch_seconds"]) for r in full]
    evals = [float(r["radius_evals"]) for r in full if r.get("radius_evals")]
    return seconds, evals


def setting(row: dict) -> str:
    parts = [p for p in row["point"].split(", ") if not p.startswith(("seed=", "kappa="))]
    return ", ".join(parts) or "specification"


def main() -> None:
    tradeoff, cost = Path(sys.argv[1]), Path(sys.argv[2])
    rows = [r for r in study_table(tradeoff) if r["method"] in ("acert", "ibp")]
    rows += study_table(cost)
    ibp_seconds = [
        s
        for r in rows
        if r["method"] == "ibp" and r.get("eps_train") == r["eps_max"]
        for s in full_eps_epochs(tradeoff / r["run"])[0]
    ]
    ibp_epoch = statistics.median(ibp_seconds)
    kappas = {
        r["kappa"] for r in study_table(cost) if r["method"] == "acert" and r["kappa"] is not None
    }
    chosen = [r for r in rows if r["method"] == "acert" and r.get("kappa") in kappas]
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in chosen:
        groups.setdefault((setting(r), r["kappa"]), []).append(r)
    spec = {
        kappa: seed_points(members)[0]
        for (name, kappa), members in groups.items()
        if name == "specification"
    }
    print(f"IBP epoch at ε_max (median of {len(ibp_seconds)}): {ibp_epoch:.1f} s\n")
    print(
        "| search | κ | seeds | clean % | ACR % of ε_max | within the specification's range"
        " | evaluations / sample | epoch (s) | epoch / IBP epoch |"
    )
    print("|---|---:|---:|---:|---:|---|---:|---:|---:|")
    for (name, kappa), members in sorted(
        groups.items(), key=lambda g: (g[0][1], g[0][0] != "specification", g[0][0])
    ):
        [point] = seed_points(members)
        seconds, evals = [], []
        for r in members:
            s, e = full_eps_epochs((tradeoff if name == "specification" else cost) / r["run"])
            seconds += s
            evals += e
        reference = spec.get(kappa)
        overlap = (
            "–" if name == "specification" or reference is None else _overlap(point, reference)
        )
        epoch = statistics.median(seconds)
        print(
            f"| {name} | {kappa:g} | {len(point.seeds)} | {point.clean.text()} "
            f"| {point.acr_pct.text()} | {overlap} | {statistics.mean(evals):.2f} "
            f"| {epoch:.1f} | {epoch / ibp_epoch:.2f} |"
        )


def _overlap(point: SeedPoint, reference: SeedPoint) -> str:
    clean, acr = point.clean.meets(reference.clean), point.acr_pct.meets(reference.acr_pct)
    return {(True, True): "yes", (True, False): "no (ACR)", (False, True): "no (clean)"}.get(
        (clean, acr), "no"
    )


if __name__ == "__main__":
    main()
