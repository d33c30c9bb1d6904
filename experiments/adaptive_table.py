"""The table of docs/RESULTS.md's adaptive study from a study folder: one row per point (method
and knobs), its seeds' clean accuracy and ACR (% of ε_max) under IBP and under the best-of
certificate (mean [lowest, highest]; the seeds each certificate covers), the attack radius as
the upper bound, and the training minutes.

usage: python experiments/adaptive_table.py experiments/results/adaptive-mnist5k
"""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

from acert.records.seeds import Spread


def spread(values: list[float]) -> str:
    return Spread.of(values).text() if values else "–"


def main(folder: str) -> None:
    points: dict[str, dict[str, list]] = {}
    for run in sorted(Path(folder).iterdir()):
        if not (run / "test_metrics.json").is_file():
            continue
        point = re.sub(r"-seed\d+$", "", run.name)
        seed = int(run.name.rsplit("seed", 1)[1])
        entry = points.setdefault(point, {"seeds": [], "clean": [], "ibp": [], "best": []})
        entry.setdefault("attack", []).append(None)
        entry.setdefault("minutes", [])
        entry["seeds"].append(seed)
        metrics = json.loads((run / "test_metrics.json").read_text())
        eps_max = metrics["eps_max"]
        with open(run / "metrics.csv") as rows:
            entry["minutes"].append(
                sum(float(r["epoch_seconds"]) for r in csv.DictReader(rows)) / 60
            )
        for bound in ("ibp", "best"):
            path = run / f"certify_{bound}.json"
            if path.is_file():
                cert = json.loads(path.read_text())
                entry[bound].append(100 * cert["acr"] / eps_max)
                if bound == "ibp":
                    entry["clean"].append(100 * cert["clean_accuracy"])
                if cert.get("acr_attack") is not None:
                    entry["attack"][-1] = 100 * cert["acr_attack"] / eps_max
    print(
        "| point | seeds | clean % | ACR, IBP | ACR, best (seeds) | attack (seeds) | training min |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for point, entry in points.items():
        attack = [a for a in entry["attack"] if a is not None]
        best = f"{spread(entry['best'])} ({len(entry['best'])})" if entry["best"] else "–"
        attack_text = f"{spread(attack)} ({len(attack)})" if attack else "–"
        minutes = spread(entry["minutes"])
        print(
            f"| {point} | {','.join(map(str, entry['seeds']))} | {spread(entry['clean'])} "
            f"| {spread(entry['ibp'])} | {best} | {attack_text} | {minutes} |"
        )


if __name__ == "__main__":
    main(sys.argv[1])
