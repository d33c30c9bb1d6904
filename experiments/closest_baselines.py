"""The two baselines whose points come closest to ACERT's front in a study (IBP certificates).

A baseline point's distance is its ACR (% of ε_max) minus ACERT's at the same clean accuracy,
ACERT's front being the upper envelope of its points, linear between them and flat beyond its
ends; a method's score is its best point's. IBP, which the study seeds anyway, PGD and standard
training (no certificate to speak of) are not candidates. Prints the two names on stdout and
every score on stderr.

usage: python experiments/closest_baselines.py STUDY_FOLDER
"""

from __future__ import annotations

import sys

import numpy as np

from acert.records.study import study_table

NOT_CANDIDATES = {"acert", "ibp", "pgd", "standard"}


def acert_front(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """ACERT's (clean accuracy, ACR %) points, sorted by clean accuracy, on their upper envelope."""
    points = sorted((r["clean_acc"], r["acr_pct"]) for r in rows if r["method"] == "acert")
    if not points:
        raise SystemExit("closest_baselines: the study has no finished ACERT run")
    kept: list[tuple[float, float]] = []
    for clean, acr in reversed(points):  # keep a point only if no more accurate one is more robust
        if not kept or acr > kept[-1][1]:
            kept.append((clean, acr))
    kept.reverse()
    return np.array([c for c, _ in kept]), np.array([a for _, a in kept])


def scores(study: str) -> dict[str, float]:
    """Each candidate method's best (ACR % − ACERT's front at the same clean accuracy)."""
    rows = study_table(study)
    clean, acr = acert_front(rows)
    best: dict[str, float] = {}
    for row in rows:
        if row["method"] in NOT_CANDIDATES:
            continue
        gap = row["acr_pct"] - float(np.interp(row["clean_acc"], clean, acr))
        best[row["method"]] = max(gap, best.get(row["method"], -np.inf))
    return best


def main() -> None:
    best = scores(sys.argv[1])
    ranked = sorted(best, key=best.get, reverse=True)
    for method in ranked:
        gap = f"{best[method]:+.2f} points of ε_max"
        print(f"{method}: {gap} against ACERT's front", file=sys.stderr)
    print(" ".join(ranked[:2]))


if __name__ == "__main__":
    main()
