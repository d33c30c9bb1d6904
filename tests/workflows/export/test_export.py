"""``acert.workflows.export.run``: ONNX + VNNLIB + instances.csv for complete verifiers (VNN-COMP
formats)."""

from __future__ import annotations

import csv
import errno
import importlib.util
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import acert
import acert.workflows.export.run
from acert.config import TrainConfig, resolve
from acert.data import ImageSet, load_imageset, stratified_subset
from acert.foundation.errors import AcertError
from acert.records.runs import RunDir, build_model, load
from acert.workflows.certify.runs import DataSelection
from acert.workflows.export.run import ExportResult, PropertySettings, export_run

HAS_EXPORT_EXTRA = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime"))
needs_onnx = pytest.mark.skipif(
    not HAS_EXPORT_EXTRA, reason="needs onnx and onnxruntime: pip install 'acert[export]'"
)

EPS = 0.1
N = 12
PIXELS, CLASSES = 28 * 28, 10


# ------------------------------------------------------------------------------------ runs
def _fit_briefly(model: torch.nn.Module, data: ImageSet, steps: int = 25) -> None:
    """A few Adam steps on mnist5k, so that the model is better than chance and BN stats move."""
    generator = torch.Generator().manual_seed(0)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        rows = torch.randint(len(data), (64,), generator=generator)
        loss = F.cross_entropy(model(data.floats(rows)), data.labels[rows])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()


def make_run(folder: Path, model_name: str, train: bool = True) -> Path:
    """A run folder holding a resolved mnist5k config and a ``last`` checkpoint."""
    torch.manual_seed(0)
    config = resolve(TrainConfig(model=model_name, epochs=1))
    model = build_model(config)
    if train:
        _fit_briefly(model, load_imageset("mnist5k", "train"))
    run = RunDir(folder).create()
    run.save_config(config)
    run.save_checkpoint("last", {"config": config.to_dict(), "model": model.state_dict()})
    return run.path


@pytest.fixture(scope="module")
def test_split() -> ImageSet:
    return load_imageset("mnist5k", "test")


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("mlp") / "run", "mlp-small")


@pytest.fixture(scope="module", params=["mlp-small", "cnn7-tiny", "resnet-cifar"])
def exported(request, tmp_path_factory) -> tuple[Path, ExportResult]:
    """(run folder, result) of exporting N properties at EPS into <tmp>/bench/{onnx,vnnlib}."""
    if not HAS_EXPORT_EXTRA:
        pytest.skip("needs onnx and onnxruntime: pip install 'acert[export]'")
    root = tmp_path_factory.mktemp(request.param)
    run = make_run(root / "run", request.param)
    bench = root / "bench"
    result = export_run(
        run, bench / "onnx" / "model.onnx", bench / "vnnlib", PropertySettings(EPS, N)
    )
    return run, result


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# ---------------------------------------------------------------------------------- VNNLIB
NUMBER = r"(\d+\.\d+)"  # positional decimals only: no sign, no exponent
DECLARE = re.compile(r"\(declare-const ([XY])_(\d+) Real\)")
BOUND = re.compile(rf"\(assert \((<=|>=) X_(\d+) {NUMBER}\)\)")
UNSAFE = re.compile(r"\(assert \(or(?: \(and \(>= Y_\d+ Y_\d+\)\))+\)\)")
DISJUNCT = re.compile(r"\(and \(>= Y_(\d+) Y_(\d+)\)\)")


@dataclass
class Property:
    """What a VNNLIB file says: declared variables, the input box and the unsafe disjuncts."""

    inputs: list[int] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)
    upper: dict[int, list[str]] = field(default_factory=dict)
    lower: dict[int, list[str]] = field(default_factory=dict)
    unsafe: list[list[tuple[int, int]]] = field(default_factory=list)


def statements(text: str) -> list[str]:
    """Top-level s-expressions without comments, whitespace collapsed and trimmed inside parens."""
    code = " ".join(line.split(";", 1)[0] for line in text.splitlines())
    found, depth, start = [], 0, 0
    for position, char in enumerate(code):
        if char == "(":
            start = position if depth == 0 else start
            depth += 1
        elif char == ")":
            depth -= 1
            assert depth >= 0, "unbalanced parentheses"
            if depth == 0:
                found.append(code[start : position + 1])
    assert depth == 0, "unbalanced parentheses"
    return [re.sub(r"\(\s+", "(", re.sub(r"\s+\)", ")", " ".join(s.split()))) for s in found]


def parse_vnnlib(text: str) -> Property:
    """Parse the subset of VNNLIB that the export writes; fail on any other statement."""
    prop = Property()
    for statement in statements(text):
        if match := DECLARE.fullmatch(statement):
            (prop.inputs if match[1] == "X" else prop.outputs).append(int(match[2]))
        elif match := BOUND.fullmatch(statement):
            side = prop.upper if match[1] == "<=" else prop.lower
            side.setdefault(int(match[2]), []).append(match[3])
        elif UNSAFE.fullmatch(statement):
            prop.unsafe.append([(int(t), int(y)) for t, y in DISJUNCT.findall(statement)])
        else:
            raise AssertionError(f"unexpected statement {statement[:80]}")
    return prop


def index_of(path: Path) -> int:
    match = re.fullmatch(r"prop_(\d+)\.vnnlib", path.name)
    assert match, path.name
    return int(match[1])


def test_the_parser_reads_a_hand_written_property():
    text = "; c (\n(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(declare-const Y_1 Real)\n"
    text += "(assert (<= X_0 0.5))\n(assert (>= X_0 0.25))\n(assert (or\n (and (>= Y_1 Y_0))\n))\n"
    prop = parse_vnnlib(text)
    assert (prop.inputs, prop.outputs) == ([0], [0, 1])
    assert (prop.upper, prop.lower, prop.unsafe) == ({0: ["0.5"]}, {0: ["0.25"]}, [[(1, 0)]])
    with pytest.raises(AssertionError, match="unexpected"):
        parse_vnnlib("(assert (<= X_0 1e-05))")


def test_properties_state_the_clipped_box_and_the_unsafe_region(exported, test_split):
    _, result = exported
    assert len(result.vnnlib_paths) == N
    for position, path in enumerate(result.vnnlib_paths):
        index = index_of(path)
        assert index == result.indices[position]
        prop = parse_vnnlib(path.read_text())
        assert prop.inputs == list(range(PIXELS)) and prop.outputs == list(range(CLASSES))
        x = test_split.floats()[index].double().flatten()
        assert sorted(prop.upper) == sorted(prop.lower) == list(range(PIXELS))
        assert all(len(v) == 1 for v in [*prop.upper.values(), *prop.lower.values()])
        upper = torch.tensor([float(prop.upper[k][0]) for k in range(PIXELS)], dtype=torch.float64)
        lower = torch.tensor([float(prop.lower[k][0]) for k in range(PIXELS)], dtype=torch.float64)
        assert torch.allclose(upper, (x + EPS).clamp(0, 1), rtol=0, atol=1e-7)
        assert torch.allclose(lower, (x - EPS).clamp(0, 1), rtol=0, atol=1e-7)
        y = int(test_split.labels[index])
        assert result.labels[position] == y
        assert prop.unsafe == [[(t, y) for t in range(CLASSES) if t != y]]


@needs_onnx
def test_box_bounds_are_written_exactly_even_for_a_tiny_eps(mlp_run, tmp_path, test_split):
    eps = 1e-6
    result = export_run(
        mlp_run, tmp_path / "model.onnx", tmp_path / "props", PropertySettings(eps, 1, seed=4)
    )
    assert len(result.indices) == 1  # fewer inputs than classes is allowed
    prop = parse_vnnlib(result.vnnlib_paths[0].read_text())
    x = test_split.floats()[result.indices[0]].double().flatten().tolist()
    for k, value in enumerate(x):
        assert float(prop.lower[k][0]) == max(value - eps, 0.0)
        assert float(prop.upper[k][0]) == min(value + eps, 1.0)


# ------------------------------------------------------------------------------------ ONNX
def onnx_logits(session, x: torch.Tensor) -> np.ndarray:
    return np.concatenate([session.run(["output"], {"input": p[None].numpy()})[0] for p in x])


def test_onnx_file_is_valid_and_matches_torch(exported, test_split):
    import onnx
    import onnxruntime as ort

    run, result = exported
    proto = onnx.load(result.onnx_path)
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["input"]
    dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 1, 28, 28]
    assert [d.dim_value for d in proto.graph.output[0].type.tensor_type.shape.dim] == [1, 10]
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 13
    assert "Identity" not in {node.op_type for node in proto.graph.node}
    session = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"])
    x = test_split.floats(torch.tensor(result.indices))
    with torch.no_grad():
        expected = load(run)(x).numpy()
    assert np.abs(onnx_logits(session, x) - expected).max() < 1e-4
    assert 0 <= result.max_abs_diff < 1e-4
    assert result.predictions == expected.argmax(1).tolist()


def test_onnx_starts_with_the_first_conv_or_gemm_and_matches_torch_to_1e_5(exported, test_split):
    import onnx
    import onnxruntime as ort

    run, result = exported
    proto = onnx.load(result.onnx_path)
    ops = [node.op_type for node in proto.graph.node]
    compute = [op for op in ops if op not in ("Flatten", "Reshape")]
    assert compute[0] in ("Conv", "Gemm") and not {"Sub", "Div"} & set(ops)  # Normalize folded
    session = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"])
    x = test_split.floats(torch.tensor(result.indices))
    points = torch.cat([x, (x - EPS).clamp(0, 1), (x + EPS).clamp(0, 1)])
    with torch.no_grad():
        expected = load(run)(points).numpy()
    scale = max(1.0, float(np.abs(expected).max()))
    assert np.abs(onnx_logits(session, points) - expected).max() < 1e-5 * scale


def test_a_traced_models_joins_are_onnx_add_and_concat_nodes(exported, test_split):
    """resnet-cifar (an nn.Module traced into a graph) exports its shortcuts' sums as Add."""
    import onnx

    run, result = exported
    ops = [node.op_type for node in onnx.load(result.onnx_path).graph.node]
    is_resnet = type(load(run)).__name__ == "ResNetCIFAR"
    assert ops.count("Add") == (2 if is_resnet else 0), ops


@needs_onnx
@pytest.mark.train
def test_a_network_of_ones_own_with_concat_exports_and_matches_torch(tmp_path, test_split):
    import onnx

    from tests.kit.graphs import build_graph_net

    data = load_imageset("mnist5k", "train").subset(torch.arange(120))
    model = build_graph_net("cat", (1, 28, 28), CLASSES)
    acert.fit(
        model, (data.floats(), data.labels), eps_max=EPS, epochs=1, out=tmp_path / "run",
        progress=False, batch_size=40, method="ibp",
    )  # fmt: skip
    result = export_run(
        tmp_path / "run", tmp_path / "model.onnx", tmp_path / "props", PropertySettings(EPS, 3),
        DataSelection(dataset="mnist5k"),
    )  # fmt: skip
    ops = [node.op_type for node in onnx.load(result.onnx_path).graph.node]
    assert ops.count("Concat") == 1 and ops[0] == "Conv" and not {"Sub", "Div"} & set(ops)
    assert 0 <= result.max_abs_diff < 1e-4


@needs_onnx
def test_equal_untrained_parameters_are_not_aliased_by_identity_nodes(tmp_path):
    import onnx

    run = make_run(tmp_path / "run", "mlp-small", train=False)  # fresh BN: equal weight tensors
    result = export_run(run, tmp_path / "model.onnx", tmp_path / "props", PropertySettings(EPS, 2))
    proto = onnx.load(result.onnx_path)
    assert "Identity" not in {node.op_type for node in proto.graph.node}
    assert result.max_abs_diff < 1e-4


# ------------------------------------------------------------------------ selection, CSV
def test_inputs_are_the_stratified_subset_of_the_split(exported, test_split):
    _, result = exported
    subset = stratified_subset(test_split, N, seed=0)
    indices = torch.tensor(result.indices)
    assert result.indices == sorted(result.indices)
    assert torch.equal(test_split.images[indices], subset.images)
    assert torch.equal(test_split.labels[indices], subset.labels)


def test_instances_csv_points_to_the_written_files(exported):
    _, result = exported
    assert result.instances_path == result.vnnlib_paths[0].parent.parent / "instances.csv"
    rows = list(csv.reader(result.instances_path.read_text().splitlines()))
    assert len(rows) == N and all(len(row) == 3 for row in rows)
    base = result.instances_path.parent
    for row, vnnlib_path in zip(rows, result.vnnlib_paths, strict=True):
        assert not Path(row[0]).is_absolute() and not Path(row[1]).is_absolute()
        assert (base / row[0]).resolve() == result.onnx_path.resolve()
        assert (base / row[1]).resolve() == vnnlib_path.resolve()
        assert (base / row[1]).is_file() and float(
            row[2]
        ) == acert.workflows.export.run.DEFAULT_TIMEOUT
    assert rows[0][:2] == ["onnx/model.onnx", f"vnnlib/prop_{result.indices[0]}.vnnlib"]


def test_abcrown_config_runs_the_written_benchmark(exported):
    from string import Template

    import yaml

    _, result = exported
    assert result.abcrown_path == result.instances_path.parent / "abcrown.yaml"
    config = yaml.safe_load(result.abcrown_path.read_text())
    general = config["general"]
    assert general["conv_mode"] == "patches" and general["device"] in ("cpu", "cuda")
    assert config["solver"]["crown"]["compare_crown_with_ibp"] is True
    assert float(config["bab"]["timeout"]) == acert.workflows.export.run.DEFAULT_TIMEOUT
    # αβ-CROWN substitutes ${CONFIG_PATH} in root_path with the config file's folder
    root = Path(Template(general["root_path"]).substitute(CONFIG_PATH=result.abcrown_path.parent))
    assert (root / general["csv_name"]).resolve() == result.instances_path.resolve()
    rows = list(csv.reader((root / general["csv_name"]).read_text().splitlines()))
    assert all((root / r[0]).is_file() and (root / r[1]).is_file() for r in rows)
    assert {float(r[2]) for r in rows} == {float(config["bab"]["timeout"])}


@needs_onnx
def test_only_correct_draws_correctly_classified_inputs(mlp_run, tmp_path):
    properties = PropertySettings(EPS, 10, seed=3, timeout=30, only_correct=True)
    result = export_run(mlp_run, tmp_path / "m.onnx", tmp_path / "p", properties)
    assert result.predictions == result.labels and len(result.indices) == 10
    assert (tmp_path / "instances.csv").read_text().splitlines()[0].endswith(",30")
    assert "\n  timeout: 30  #" in (tmp_path / "abcrown.yaml").read_text()


# ---------------------------------------------------------------------------------- errors
BAD_CALLS = {
    "eps zero": ({"eps": 0.0}, "eps must lie in (0, 1) pixel units, got 0.0"),
    "eps one": ({"eps": 1.0}, "eps must lie in (0, 1)"),
    "eps negative": ({"eps": -0.1}, "eps must lie in (0, 1)"),
    "eps nan": ({"eps": math.nan}, "eps must lie in (0, 1)"),
    "eps text": ({"eps": "0.1"}, "eps must be a number in (0, 1) pixel units"),
    "n zero": ({"n": 0}, "n must be >= 1 (properties to write), got 0"),
    "n fractional": ({"n": 2.5}, "n must be a whole number >= 1"),
    "n too big": ({"n": 1001}, "exceeds the 1000 inputs of the mnist5k test split"),
    "timeout": ({"timeout": 0.0}, "timeout must be > 0 (seconds per instance)"),
    "seed": ({"seed": 1.5}, "seed must be a whole number"),
    "only correct": ({"only_correct": "yes"}, "only_correct must be True or False"),
    "split": ({"split": "val"}, "unknown split 'val'"),
    "limit": ({"limit": 10}, "an export draws properties.n inputs itself; leave data.limit"),
    "missing run": ({"run": "missing"}, "does not exist"),
    "other shape": ({"dataset": "cifar10"}, "does not fit the run's model"),
    "too few correct": ({"n": 1000, "only_correct": True}, "are classified correctly"),
    "onnx is a folder": ({"onnx_path": "."}, "is a folder"),
}


PROPERTY_FIELDS = ("eps", "n", "seed", "timeout", "only_correct")


@needs_onnx
@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_input_gives_a_one_line_error_and_writes_nothing(name, mlp_run, tmp_path):
    changes, message = BAD_CALLS[name]
    out = tmp_path / "out"
    call = {"run": mlp_run, "onnx_path": out / "m.onnx", "vnnlib_dir": out / "p", "eps": EPS}
    call = {**call, "n": 5, **changes}
    call["run"] = tmp_path / call["run"] if call["run"] == "missing" else call["run"]
    call["onnx_path"] = tmp_path if call["onnx_path"] == "." else call["onnx_path"]
    with pytest.raises(AcertError, match=re.escape(message)) as err:
        properties = PropertySettings(**{k: call.pop(k) for k in PROPERTY_FIELDS if k in call})
        data = DataSelection(**{k: call.pop(k) for k in ("dataset", "split", "limit") if k in call})
        export_run(**call, properties=properties, data=data)
    assert "\n" not in str(err.value)
    assert not out.exists()


def test_missing_onnxruntime_names_the_extra(mlp_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes the import fail
    with pytest.raises(AcertError, match=re.escape("pip install 'acert[export]'")) as err:
        export_run(mlp_run, tmp_path / "m.onnx", tmp_path / "p", PropertySettings(EPS, 5))
    assert "\n" not in str(err.value) and files_under(tmp_path) == []


@needs_onnx
def test_an_onnx_mismatch_leaves_no_file(mlp_run, tmp_path, monkeypatch):
    monkeypatch.setattr(
        acert.workflows.export.run, "ONNX_TOLERANCE", 0.0
    )  # any difference, even 0, fails
    with pytest.raises(AcertError, match="differs from the torch model") as err:
        export_run(mlp_run, tmp_path / "m.onnx", tmp_path / "p", PropertySettings(EPS, 5))
    assert "\n" not in str(err.value) and files_under(tmp_path) == []


@needs_onnx
def test_a_failed_write_removes_what_this_export_wrote(mlp_run, tmp_path, monkeypatch):
    real_write, calls = acert.workflows.export.run.atomic_write, []

    def full_disk_on_third_file(path, write):
        calls.append(path)
        if len(calls) < 3:
            return real_write(path, write)

        def half(stream):
            stream.write(b"(declare-const")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

        return real_write(path, half)

    monkeypatch.setattr(acert.workflows.export.run, "atomic_write", full_disk_on_third_file)
    with pytest.raises(AcertError, match=r"could not write .*No space left on device") as err:
        export_run(mlp_run, tmp_path / "m.onnx", tmp_path / "p", PropertySettings(EPS, 5))
    assert "\n" not in str(err.value)
    assert len(calls) == 3 and files_under(tmp_path) == []  # no temporaries, no finished files
