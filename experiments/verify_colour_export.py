"""Helpers of experiments/verify_colour_export.sh (docs/VERIFIERS.md, "A colour export run on
αβ-CROWN").

    python experiments/verify_colour_export.py batches JPEG_DIR OUT_DIR --train N --test M
        CIFAR-10 as JPEG files (train/<class>/*.jpg, test/<class>/*.jpg; ../shared/data/README.md)
        written as the CIFAR-10 python batches that acert's cifar10 reader reads: the first N
        training and M test images of each class, in file-name order, in data_batch_1..5 and
        test_batch of OUT_DIR.
    python experiments/verify_colour_export.py verdicts BENCH RUN --eps E --data-dir D
        αβ-CROWN's verdicts (BENCH/abcrown_results.pkl, rows of BENCH/instances.csv) beside
        acert's certificate of the same inputs (the best of IBP, CROWN-IBP and CROWN), and
        whether any input acert certified at E was found unsafe.
"""

from __future__ import annotations

import argparse
import pickle
import re
import sys
from pathlib import Path

import numpy as np

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
TRAIN_BATCHES = 5
BOUNDS = ("ibp", "crown-ibp", "crown")  # per input the largest radius of the three


def jpeg_split(folder: Path, per_class: int) -> tuple[np.ndarray, list[int]]:
    """The first ``per_class`` images of each class as CIFAR rows (N, 3072) uint8, and labels."""
    from PIL import Image

    rows, labels = [], []
    for label, name in enumerate(CLASSES):
        files = sorted((folder / name).glob("*.jpg"))[:per_class]
        if len(files) < per_class:
            sys.exit(f"{folder / name} holds {len(files)} images, fewer than {per_class}")
        for path in files:
            pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.uint8)
            rows.append(pixels.transpose(2, 0, 1).reshape(-1))  # CIFAR rows: channel-major
            labels.append(label)
    return np.stack(rows), labels


def write_batch(path: Path, name: str, data: np.ndarray, labels: list[int]) -> None:
    batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data}
    path.write_bytes(pickle.dumps(batch, protocol=2))


def batches(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data, labels = jpeg_split(Path(args.jpeg) / "train", args.train)
    order = np.random.default_rng(0).permutation(len(labels))  # classes mixed across batches
    for index, part in enumerate(np.array_split(order, TRAIN_BATCHES), start=1):
        name = f"data_batch_{index}"
        write_batch(out / name, name, data[part], [labels[i] for i in part])
    data, labels = jpeg_split(Path(args.jpeg) / "test", args.test)
    write_batch(out / "test_batch", "test_batch", data, labels)
    print(f"wrote {len(order)} training and {len(labels)} test images to {out}")


def verdicts(args: argparse.Namespace) -> None:
    import torch

    import acert
    from acert.data import load_imageset

    bench = Path(args.bench)
    with open(bench / "abcrown_results.pkl", "rb") as stream:
        results = pickle.load(stream)["results"]
    rows = (bench / "instances.csv").read_text().splitlines()
    indices = [int(re.search(r"prop_(\d+)\.vnnlib", row).group(1)) for row in rows]
    if len(results) != len(indices):
        sys.exit(f"{len(results)} verdicts for {len(indices)} instances")
    images = load_imageset("cifar10", "test", args.data_dir)
    rows_tensor = torch.tensor(indices)
    x, y = images.floats(rows_tensor), images.labels[rows_tensor]
    model = acert.load(args.run)
    evaluation = acert.certify(
        model, (x, y), eps_max=args.eps, bound=BOUNDS, eps=[args.eps], progress=False
    )
    certified = (evaluation.radii >= args.eps).tolist()
    counts = {"safe": 0, "unsafe": 0, "unknown": 0}
    false_certificates = []
    seconds = 0.0
    for index, (verdict, time), ok in zip(indices, results, certified, strict=True):
        kind = "unsafe" if "unsafe" in verdict else "safe" if "safe" in verdict else "unknown"
        counts[kind] += 1
        seconds += float(time)
        if kind == "unsafe" and ok:
            false_certificates.append(index)
        print(f"prop_{index}: {verdict:<24} {float(time):7.1f} s   acert certified: {ok}")
    print(
        f"{len(indices)} properties at eps {args.eps:g}: {counts['safe']} safe, "
        f"{counts['unsafe']} unsafe, {counts['unknown']} unknown/timeout; "
        f"alpha-beta-CROWN {seconds:.0f} s in all; acert certified {sum(certified)}"
    )
    both = sum(
        ok and "safe" in v and "unsafe" not in v
        for (v, _), ok in zip(results, certified, strict=True)
    )
    print(f"of acert's {sum(certified)} certified: {both} verified by alpha-beta-CROWN")
    if false_certificates:
        sys.exit(f"FALSE CERTIFICATES: acert certified {false_certificates}, found unsafe")
    print("no property acert certified was found unsafe")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("batches")
    make.add_argument("jpeg")
    make.add_argument("out")
    make.add_argument("--train", type=int, required=True)
    make.add_argument("--test", type=int, required=True)
    read = sub.add_parser("verdicts")
    read.add_argument("bench")
    read.add_argument("run")
    read.add_argument("--eps", type=float, required=True)
    read.add_argument("--data-dir", required=True)
    args = parser.parse_args()
    {"batches": batches, "verdicts": verdicts}[args.command](args)


if __name__ == "__main__":
    main()
