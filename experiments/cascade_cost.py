"""A best-of certificate (IBP, CROWN-IBP, CROWN) with and without --cascade, side by side:
time, bound evaluations by kind, ACR and the largest radius difference (docs/PERFORMANCE.md,
"Best-of certificates: the cascade").

usage: python experiments/cascade_cost.py RUN_FOLDER [N_IMAGES]   (one thread)
"""

from __future__ import annotations

import sys
import time

import torch

import acert.bounds.crown as crown
from acert.data import load_imageset, stratified_subset
from acert.evaluation.evaluate import EvaluationSettings, evaluate
from acert.records.runs import RunDir, load

BOUNDS = ("ibp", "crown-ibp", "crown")


def main(run: str, n: int) -> None:
    torch.set_num_threads(1)
    config = RunDir(run).load_config()
    model = load(run).eval()
    images = stratified_subset(load_imageset(config.dataset, "test"), n, seed=0)
    x, y = images.floats(), images.labels
    counted_margins, rows = crown.crown_margins, {}

    def counting(model, box, y, stats=None, intermediate="crown", **kwargs):
        kind = "crown" if intermediate == "crown" else "crown-ibp"
        rows[kind] = rows.get(kind, 0) + box.lower.shape[0]
        return counted_margins(model, box, y, stats, intermediate=intermediate, **kwargs)

    crown.crown_margins = counting
    radii = {}
    for cascade in (False, True):
        rows.clear()
        settings = EvaluationSettings(
            config.eps_max, cert_eps=(0.1,), bounds=BOUNDS, pgd_steps=0, cascade=cascade
        )
        start = time.perf_counter()
        result = evaluate(model, x, y, settings)
        seconds = time.perf_counter() - start
        radii[cascade] = result.radii
        print(
            f"cascade={cascade}: {seconds:.1f} s, ACR {result.acr:.5f}, certified @ 0.1 "
            f"{result.certified_accuracy[0.1]:.3f}, evaluations/sample "
            f"{result.radius_evaluations:.2f}, sample-evaluations {rows}",
            flush=True,
        )
    print("largest radius difference", (radii[True] - radii[False]).abs().max().item())


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 40)
