"""``acert.workflows.export.fold`` and the folded ONNX export: Normalize folded exactly into the
first Conv/Linear, or a leading 1x1 conv before a zero-padded conv with nonzero means, the graph
starting with Conv or Gemm (docs/VERIFIERS.md)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import acert.workflows.export.onnx_graph
from acert.config import TrainConfig, resolve
from acert.data import load_imageset
from acert.foundation.errors import AcertError
from acert.models import Normalize
from acert.records.runs import RunDir, build_model, load
from acert.workflows.certify.runs import DataSelection
from acert.workflows.export.fold import fold_normalize
from acert.workflows.export.run import PropertySettings, export_run
from tests.kit.data import write_cifar

HAS_EXPORT_EXTRA = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime"))
needs_onnx = pytest.mark.skipif(
    not HAS_EXPORT_EXTRA, reason="needs onnx and onnxruntime: pip install 'acert[export]'"
)

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)
SHAPE_ONLY = {"Flatten", "Reshape"}


def randomise_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters, eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=generator))
                m.running_var.copy_(0.2 + 2 * torch.rand(c, generator=generator))
                m.weight.copy_(0.5 + torch.rand(c, generator=generator))
                m.bias.copy_(torch.randn(c, generator=generator))
    return model.eval()


def cifar_like_cnn(
    padding: int = 1, mean: tuple[float, ...] = CIFAR_MEAN, padding_mode: str = "zeros"
) -> nn.Sequential:
    """3x8x8 input, CIFAR-10's normalisation, a padded conv + BN first, then conv, linear."""
    torch.manual_seed(0)
    layers = [
        Normalize(mean, CIFAR_STD),
        nn.Conv2d(3, 4, 3, padding=padding, padding_mode=padding_mode),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.LazyLinear(5),
    ]
    model = nn.Sequential(*layers)
    model(torch.rand(1, 3, 8, 8))  # materialise the lazy linear
    return randomise_batchnorm(model)


def fashion_like_mlp() -> nn.Sequential:
    """1x6x6 input, Fashion-MNIST's normalisation, Flatten + Linear first."""
    torch.manual_seed(0)
    layers = [Normalize(FASHION_MEAN, FASHION_STD), nn.Flatten(), nn.Linear(36, 16)]
    layers += [nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 5)]
    return randomise_batchnorm(nn.Sequential(*layers))


def boxes(shape: tuple[int, ...], eps: float = 0.1, count: int = 6) -> torch.Tensor:
    """Centres and corners of ``count`` random ε-boxes (the points the export checks)."""
    x = torch.rand(count, *shape, generator=torch.Generator().manual_seed(1))
    return acert.workflows.export.onnx_graph.check_points(x, eps, seed=2)


def relative_gap(got: torch.Tensor | np.ndarray, expected: torch.Tensor) -> float:
    got = torch.as_tensor(got, dtype=torch.float64)
    scale = max(1.0, float(expected.abs().max()))
    return float((got - expected.double()).abs().max()) / scale


# ------------------------------------------------------------------------------ the fold
@pytest.mark.parametrize(
    ("build", "shape"), [(cifar_like_cnn, (3, 8, 8)), (fashion_like_mlp, (1, 6, 6))]
)
def test_the_fold_is_exact_and_drops_normalize(build, shape):
    model = build()
    x = boxes(shape)
    folded = fold_normalize(model)
    assert not any(isinstance(m, Normalize) for m in folded)
    assert isinstance(model[0], Normalize)  # the original is left alone
    with torch.no_grad():
        assert relative_gap(folded(x), model(x)) < 1e-6


def test_a_zero_padded_conv_with_nonzero_means_gets_a_leading_one_by_one_conv():
    model = cifar_like_cnn()
    x = boxes((3, 8, 8))
    folded = fold_normalize(model)
    assert [type(m).__name__ for m in folded[:4]] == ["Conv2d", "Conv2d", "BatchNorm2d", "ReLU"]
    scale = folded[0]
    assert scale.kernel_size == (1, 1) and scale.padding == (0, 0)
    weight = scale.weight.view(3, 3)
    std, mean = torch.tensor(CIFAR_STD), torch.tensor(CIFAR_MEAN)
    assert torch.equal(weight, torch.diag(torch.diag(weight)))  # each channel scaled alone
    assert torch.allclose(torch.diag(weight), 1 / std) and torch.allclose(scale.bias, -mean / std)
    assert torch.equal(folded[1].weight, model[1].weight)  # the padded conv is left as it was
    assert folded[1].padding == (1, 1)
    with torch.no_grad():
        assert relative_gap(folded(x), model(x)) < 1e-6


PLAIN_FOLDS = {
    "padding 0": {"padding": 0},
    "mean 0": {"mean": (0.0, 0.0, 0.0)},
    "reflect padding": {"padding_mode": "reflect"},  # pads with copies of normalised pixels
}


@pytest.mark.parametrize("case", list(PLAIN_FOLDS))
def test_the_plain_fold_where_it_is_exact(case):
    model = cifar_like_cnn(**PLAIN_FOLDS[case])
    x = boxes((3, 8, 8))
    folded = fold_normalize(model)
    assert [type(m).__name__ for m in folded[:3]] == ["Conv2d", "BatchNorm2d", "ReLU"]
    assert folded[0].kernel_size == (3, 3)
    with torch.no_grad():
        assert relative_gap(folded(x), model(x)) < 1e-6


@pytest.mark.parametrize(
    ("second", "message"),
    [
        (nn.ReLU(), "cannot fold the input normalisation into ReLU"),
        (nn.Conv2d(2, 2, 3, padding=1, groups=2), "grouped Conv2d (groups=2)"),
    ],
)
def test_an_unfoldable_first_layer_is_a_one_line_error(second, message):
    model = nn.Sequential(Normalize((0.5, 0.4), (0.2, 0.3)), second, nn.Flatten()).eval()
    with pytest.raises(AcertError, match=re.escape(message)) as err:
        fold_normalize(model)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------ the ONNX
def first_compute_node(proto) -> str:
    return next(n.op_type for n in proto.graph.node if n.op_type not in SHAPE_ONLY)


@needs_onnx
@pytest.mark.parametrize(
    ("build", "shape", "first"),
    [(cifar_like_cnn, (3, 8, 8), "Conv"), (fashion_like_mlp, (1, 6, 6), "Gemm")],
)
def test_the_onnx_starts_with_conv_or_gemm_and_matches_torch(build, shape, first):
    import onnx
    import onnxruntime as ort

    model = build()
    x = boxes(shape)
    data = acert.workflows.export.onnx_graph.onnx_bytes(model, x[:1], onnx, "test")
    proto = onnx.load_model_from_string(data)
    ops = [node.op_type for node in proto.graph.node]
    assert first_compute_node(proto) == first and not {"Sub", "Div"} & set(ops)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = np.concatenate([session.run(["output"], {"input": p[None].numpy()})[0] for p in x])
    with torch.no_grad():
        assert relative_gap(got, model(x)) < 1e-5
    assert acert.workflows.export.onnx_graph.verify_onnx(data, model, x, ort, 1e-5) < 1e-5


def conv_kernels(proto) -> list[list[int]]:
    """The kernel shape of each Conv node of the graph, in order."""
    initializers = {t.name: t for t in proto.graph.initializer}
    return [
        list(initializers[node.input[1]].dims[2:])
        for node in proto.graph.node
        if node.op_type == "Conv"
    ]


def constants_added(proto) -> list[list[int]]:
    """The shapes of the constants that the graph's Add nodes add."""
    initializers = {t.name: t for t in proto.graph.initializer}
    return [
        list(initializers[name].dims)
        for node in proto.graph.node
        if node.op_type == "Add"
        for name in node.input
        if name in initializers
    ]


@needs_onnx
def test_a_colour_export_is_a_one_by_one_conv_then_the_padded_conv_and_adds_no_map():
    """αβ-CROWN's patches mode crashed on the border map this export used to add after the
    first conv (a constant of the conv's output shape); docs/VERIFIERS.md."""
    import onnx
    import onnxruntime as ort

    model = cifar_like_cnn()
    x = boxes((3, 8, 8))
    data = acert.workflows.export.onnx_graph.onnx_bytes(model, x[:1], onnx, "test")
    proto = onnx.load_model_from_string(data)
    ops = [node.op_type for node in proto.graph.node]
    assert ops[:3] == ["Conv", "Conv", "Relu"] and constants_added(proto) == []
    assert conv_kernels(proto)[:2] == [[1, 1], [3, 3]]
    first, second = proto.graph.node[:2]
    assert second.input[0] == first.output[0] and first.input[0] == "input"
    assert acert.workflows.export.onnx_graph.verify_onnx(data, model, x, ort, 1e-5) < 1e-5


def grey_cnn(mean: float) -> nn.Sequential:
    """1x8x8 input, a zero-padded conv first (as mnist5k's CNNs)."""
    torch.manual_seed(0)
    layers = [Normalize((mean,), (0.3,)), nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()]
    layers += [nn.Flatten(), nn.Linear(4 * 8 * 8, 5)]
    return nn.Sequential(*layers).eval()


@needs_onnx
def test_a_grey_mean_zero_export_keeps_the_folded_conv_first():
    import onnx
    import onnxruntime as ort

    model = grey_cnn(0.0)
    x = boxes((1, 8, 8))
    data = acert.workflows.export.onnx_graph.onnx_bytes(model, x[:1], onnx, "test")
    proto = onnx.load_model_from_string(data)
    assert [node.op_type for node in proto.graph.node] == ["Conv", "Relu", "Flatten", "Gemm"]
    assert conv_kernels(proto) == [[3, 3]]
    initializers = {t.name: t for t in proto.graph.initializer}
    weight = onnx.numpy_helper.to_array(initializers[proto.graph.node[0].input[1]])
    np.testing.assert_allclose(weight, model[1].weight.detach().numpy() / 0.3, rtol=1e-6)
    assert acert.workflows.export.onnx_graph.verify_onnx(data, model, x, ort, 1e-5) < 1e-5


# ------------------------------------------------------------------- a CIFAR-10 export
@pytest.fixture(scope="module")
def cifar_run(tmp_path_factory) -> tuple[Path, Path]:
    """(run folder, data folder) of an untrained cnn7-tiny CIFAR-10 run with random BN stats."""
    root = tmp_path_factory.mktemp("cifar")
    write_cifar(root / "cifar-10-batches-py", per_batch=4)
    torch.manual_seed(0)
    config = resolve(TrainConfig(dataset="cifar10", model="cnn7-tiny", epochs=1, init="default"))
    model = randomise_batchnorm(build_model(config))
    run = RunDir(root / "run").create()
    run.save_config(config)
    run.save_checkpoint("last", {"config": config.to_dict(), "model": model.state_dict()})
    return run.path, root


@needs_onnx
def test_a_cifar10_export_starts_with_conv_and_matches_torch_on_the_boxes(cifar_run, tmp_path):
    import onnx
    import onnxruntime as ort

    run, data_dir = cifar_run
    eps = 8 / 255
    result = export_run(
        run,
        tmp_path / "onnx" / "net.onnx",
        tmp_path / "vnnlib",
        PropertySettings(eps, 4),
        DataSelection(data_dir=str(data_dir)),
    )
    proto = onnx.load(result.onnx_path)
    ops = [node.op_type for node in proto.graph.node]
    assert ops[:3] == ["Conv", "Conv", "Relu"] and not {"Add", "Sub", "Div"} & set(ops)
    assert conv_kernels(proto)[:2] == [[1, 1], [3, 3]]
    model = load(run)
    images = load_imageset("cifar10", "test", str(data_dir)).floats(torch.tensor(result.indices))
    points = acert.workflows.export.onnx_graph.check_points(images, eps, seed=6)
    session = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"])
    got = np.concatenate([session.run(["output"], {"input": p[None].numpy()})[0] for p in points])
    with torch.no_grad():
        assert relative_gap(got, model(points)) < 1e-5
        assert result.max_abs_diff < 1e-5 * max(1.0, float(model(points).abs().max()))


@needs_onnx
def test_an_inexact_fold_is_caught_and_nothing_is_written(cifar_run, tmp_path, monkeypatch):
    run, data_dir = cifar_run

    def without_the_mean(model):
        folded = fold_normalize(model)
        with torch.no_grad():
            folded[0].bias.zero_()  # the 1x1 conv divides by the std but subtracts no mean
        return folded

    monkeypatch.setattr(acert.workflows.export.onnx_graph, "fold_normalize", without_the_mean)
    out = tmp_path / "bench"
    with pytest.raises(AcertError, match="differs from the torch model") as err:
        export_run(
            run,
            out / "net.onnx",
            out / "vnnlib",
            PropertySettings(0.03, 4),
            DataSelection(data_dir=str(data_dir)),
        )
    assert "\n" not in str(err.value) and not out.exists()
