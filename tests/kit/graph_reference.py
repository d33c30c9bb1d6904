"""Numbers the bound engines must keep bit for bit when their traversal changes (issue 19).

:func:`compute` gives, on fixed seeds, for every registered model at a small input shape and
for the test kit's tiny nets and a residual one: IBP, CROWN-IBP and CROWN margin bounds (sound,
and plain with clean-batch statistics), the IBP pre-activation intervals the warm-up
regularisers read, the radius search's radii, and the clean pass with batch statistics.
``python -m tests.kit.graph_reference`` stores them in tests/bounds/data/graph_reference.pt
with the processor and torch version they came from; tests/bounds/test_graph_reference.py
recomputes them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from acert.bounds import METHODS, clean_forward, ibp, input_box, margin_bounds, margin_bounds_on_box
from acert.bounds.clean_pass import forward_with_stats
from acert.models import Normalize, Residual, create_model, list_models
from acert.radius import radius_search
from tests.kit.nets import TINY_NETS, _set_batchnorm_stats, build_tiny_net

REFERENCE = Path(__file__).parents[1] / "bounds" / "data" / "graph_reference.pt"
SMALL_SHAPES = {"cnn7-tinyimagenet": (3, 8, 8)}
"""Input shape per registered model; the others take (1, 6, 6)."""
HEAVY = ("cnn7", "cnn7-tinyimagenet")
"""Models whose CROWN radius search would take minutes on two cores: radii of IBP only."""


def processor() -> str:
    """The ``model name`` line of /proc/cpuinfo (another processor's kernels round differently)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def residual_net(seed: int = 0) -> tuple[nn.Sequential, tuple[int, ...]]:
    """A conv net with a nested residual block and batch-norms inside the bodies."""
    torch.manual_seed(seed)
    inner = Residual(nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)))
    body = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), inner)
    model = nn.Sequential(
        Normalize([0.5], [0.3]),
        nn.Conv2d(1, 3, 3, stride=2, padding=1),
        nn.ReLU(),
        Residual(body),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 3 * 3, 5),
        nn.ReLU(),
        nn.Linear(5, 3),
    )
    _set_batchnorm_stats(model, torch.Generator().manual_seed(seed + 1000))
    return model.eval(), (1, 6, 6)


AFTER_RECORDING = ("resnet-cifar",)
"""Registry entries added after the recording (a traced nn.Module: tests/test_api_graphs.py)."""


def networks() -> dict[str, tuple[nn.Sequential, tuple[int, ...]]]:
    """Every network of the reference, eval mode, by name."""
    nets = {}
    for name in sorted(set(list_models()) - set(AFTER_RECORDING)):
        shape = SMALL_SHAPES.get(name, (1, 6, 6))
        torch.manual_seed(0)
        model = create_model(name, shape, 3, [0.5] * shape[0], [0.3] * shape[0])
        _set_batchnorm_stats(model, torch.Generator().manual_seed(1))
        nets[name] = (model.eval(), shape)
    for name in TINY_NETS:
        nets[f"tiny-{name}"] = build_tiny_net(name, seed=3)
    nets["residual"] = residual_net()
    return nets


def _numbers(name: str, model: nn.Sequential, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    x = torch.rand(3, *shape, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    eps = torch.tensor([0.0, 0.002, 0.02])
    out: dict[str, torch.Tensor] = {}
    for method in METHODS:
        out[f"sound/{method}"] = margin_bounds(model, x, y, eps, method)
    radius_methods = ("ibp",) if name in HEAVY else tuple(METHODS)
    for method in radius_methods:
        out[f"radius/{method}"] = radius_search(model, x, y, 0.05, method).radius
    box = input_box(x, eps)
    with torch.no_grad():
        hidden, preactivations = ibp.propagate(list(model)[:-1], box, None, sound=False)
    out["ibp/hidden"] = torch.stack([hidden.centre, hidden.radius])
    for i, pre in enumerate(preactivations):  # the widest ball's sample only: a smaller file
        out[f"ibp/pre{i}"] = torch.stack([pre.centre[-1], pre.radius[-1]])
    # train mode: clean pass with batch statistics, then the plain bounds with them
    train = model.train()
    for module in train.modules():
        if isinstance(module, nn.Dropout):
            module.eval()
    with torch.no_grad():
        logits, stats = clean_forward(train, x, update_running_stats=False)
        out["clean/logits"] = logits
        out["clean/with_stats"] = forward_with_stats(train, x.flip(0), stats)
        for method in METHODS:
            out[f"plain/{method}"] = margin_bounds_on_box(
                train, input_box(x, 0.01), y, method, stats, sound=False
            )
    model.eval()
    return out


def compute() -> dict[str, torch.Tensor]:
    """Every number of the reference, keyed ``network/quantity``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        numbers = {}
        for name, (model, shape) in networks().items():
            for key, value in _numbers(name, model, shape).items():
                numbers[f"{name}/{key}"] = value.detach().clone()
        return numbers
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    numbers = compute()
    REFERENCE.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"processor": processor(), "torch": str(torch.__version__), "numbers": numbers}, REFERENCE
    )
    print(f"{len(numbers)} tensors -> {REFERENCE} ({REFERENCE.stat().st_size} bytes)")


if __name__ == "__main__":
    sys.exit(main())
