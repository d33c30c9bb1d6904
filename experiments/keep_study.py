"""Make a study folder fit for the repository, so that a study can go on in a later session.

A study of `acert sweep` resumes from its folder (finished runs are skipped, certificates
already computed are kept), but a session's machine keeps nothing outside the repository and
the checkpoints are large (the optimiser's state is twice the model's). This keeps, for every
finished run (``test_metrics.json``), its records: config, metrics, certificates, radii. A run
that still lacks one of the ``--bounds`` certificates keeps a slim ``checkpoints/best.pt`` (the
model and the config only: enough to certify, not to resume, and a finished run needs no
resuming); a fully certified run keeps no checkpoint. Unfinished runs are removed: the sweep
trains them again. Run it only when no sweep or certificate writes to the folder.

usage: python experiments/keep_study.py STUDY_FOLDER [--bounds ibp,best]
Then: git add STUDY_FOLDER and git add -f STUDY_FOLDER/*/checkpoints/best.pt (checkpoints are
ignored unless added by name).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

KEPT = ("format", "config", "model", "epoch", "step", "history", "best_score", "best_epoch",
        "seconds")  # fmt: skip


def certified(run: Path, bound: str) -> bool:
    path = run / f"certify_{bound}.json"
    return path.is_file() and "acr_attack" in json.loads(path.read_text())


def keep(study: Path, bounds: list[str]) -> None:
    for run in sorted(p for p in study.iterdir() if (p / "sweep.json").is_file()):  # runs only
        if not (run / "test_metrics.json").is_file():
            shutil.rmtree(run)
            print(f"{run.name}: unfinished, removed (the sweep trains it again)")
            continue
        for extra in ("tensorboard", "radius_histogram.png"):
            target = run / extra
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        checkpoints = run / "checkpoints"
        missing = [bound for bound in bounds if not certified(run, bound)]
        if not missing:
            shutil.rmtree(checkpoints, ignore_errors=True)
            print(f"{run.name}: certified, records only")
            continue
        best = checkpoints / "best.pt"
        source = best if best.is_file() else checkpoints / "last.pt"
        if not source.is_file():
            print(f"{run.name}: no checkpoint left to certify {missing} with")
            continue
        payload = torch.load(source, map_location="cpu", weights_only=True)
        slim = {key: payload[key] for key in KEPT if key in payload}
        torch.save(slim, best.with_suffix(".tmp"))
        (checkpoints / "last.pt").unlink(missing_ok=True)
        best.with_suffix(".tmp").replace(best)
        print(f"{run.name}: lacks {', '.join(missing)}; slim checkpoints/best.pt kept")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path)
    parser.add_argument("--bounds", default="ibp,best")
    args = parser.parse_args()
    keep(args.study, args.bounds.split(","))
