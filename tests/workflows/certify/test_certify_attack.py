"""Attack radii beside the certified ones, and best-of certificates (``acert certify``)."""

import json

import pytest
import torch
from torch import nn

import acert.bounds.crown
import acert.workflows.certify.runs
from acert.cli import main
from acert.config import tiny_run
from acert.data import load_imageset, stratified_subset
from acert.evaluation.evaluate import attack_check, best_of, cascade_radii
from acert.foundation.errors import AcertError
from acert.radius import radius_search
from acert.radius.attacks import AttackSearch, attack_radii
from acert.records.runs import load
from acert.workflows.certify.runs import DataSelection, certify_run, parse_bound, run_settings
from acert.workflows.train.run import _test_set
from tests.kit import short_flags

TINY = short_flags(eval_pgd_steps=2)

EPS_MAX = 0.4


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny finished run (the one of test_cli.py)."""
    out = tmp_path_factory.mktemp("attack") / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    return out


def minimal_flip(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, y: int) -> float:
    """The exact smallest ℓ∞ ε at which the two-class linear model ``weight @ x + bias`` stops
    predicting y on the ball clipped to [0, 1] (inf when it never does).

    The worst point moves every coordinate against the margin ``a·x + c`` (a = w_y - w_t)
    by min(ε, room): down to 0 where a_i > 0, up to 1 where a_i < 0. The margin is then
    piecewise linear in ε, its slope dropping by |a_i| as coordinate i reaches its bound.
    """
    w, b, x = weight.double(), bias.double(), x.double()
    a, c = w[y] - w[1 - y], (b[y] - b[1 - y]).item()
    margin = (a @ x).item() + c
    room = torch.where(a > 0, x, 1 - x)
    slope, at = a.abs().sum().item(), 0.0
    for i in torch.argsort(room).tolist():
        if slope > 0 and margin - slope * (room[i].item() - at) <= 0:
            return at + margin / slope
        margin -= slope * (room[i].item() - at)
        at, slope = room[i].item(), slope - abs(a[i].item())
    return float("inf")


def linear_model(weight, bias) -> nn.Sequential:
    layer = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return nn.Sequential(layer).eval()


def test_attack_radius_is_the_exact_flip_point_of_a_linear_model():
    weight = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    bias = torch.tensor([-0.6, 0.0])
    x = torch.tensor(
        [
            [0.05, 0.5, 0.5],  # flips at 0.2, clipping considered (0.15 without)
            [0.5, 0.5, 0.5],  # margin 0.9, slope 3: flips at 0.3
            [0.9, 0.9, 0.9],  # margin 2.1: still class 0 at the cap
            [0.1, 0.1, 0.1],  # margin -0.3: misclassified clean
        ]
    )
    y = torch.tensor([0, 0, 0, 0])
    # the oracle by hand: a = (1, 1, 1), margin 0.45 at x[0]: unclipped the flip is at
    # 0.45 / 3 = 0.15, but the first coordinate reaches 0 at 0.05 (margin 0.3 left, slope 2)
    assert minimal_flip(weight, bias, x[0], 0) == pytest.approx(0.2)
    model = linear_model(weight, bias)
    search = AttackSearch(steps=20, restarts=2, iterations=14)
    radii = attack_radii(model, x, y, EPS_MAX, search)
    resolution = EPS_MAX / 2**search.iterations
    assert radii[0].item() == pytest.approx(0.2, abs=resolution)
    assert radii[1].item() == pytest.approx(0.3, abs=resolution)
    assert radii.dtype == torch.float64 and radii[2].item() == EPS_MAX and radii[3].item() == 0
    # every reported radius is the distance of a misclassified input: never below the flip
    assert radii[0].item() >= 0.2 - 1e-6 and radii[1].item() >= 0.3 - 1e-6


def test_attack_radii_of_random_linear_models_match_the_closed_form_and_crown():
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(2, 8, generator=generator)
    bias = torch.randn(2, generator=generator) * 0.5
    x = torch.rand(40, 8, generator=generator)
    model = linear_model(weight, bias)
    y = model(x).argmax(1)
    wrong = torch.arange(40) % 7 == 0
    y[wrong] = 1 - y[wrong]  # some misclassified inputs
    search = AttackSearch(steps=20, restarts=2, iterations=12)
    radii = attack_radii(model, x, y, EPS_MAX, search)
    exact = torch.tensor(
        [
            0.0 if bad else min(minimal_flip(weight, bias, xi, int(yi)), EPS_MAX)
            for xi, yi, bad in zip(x, y, wrong, strict=True)
        ],
        dtype=torch.float64,
    )
    assert 0 < (exact[~wrong] < EPS_MAX).sum() < 34  # flips inside the cap and beyond it
    assert torch.all(radii >= exact - 1e-6)
    assert torch.allclose(radii, exact, atol=EPS_MAX / 2**search.iterations + 1e-6)
    # CROWN is exact on one linear layer: its certificate sits just below the attack radius
    certified = radius_search(model, x, y, EPS_MAX, "crown").radius.double().clamp(max=EPS_MAX)
    assert torch.all(certified <= radii)
    assert torch.allclose(certified, radii, atol=2e-3)


def test_attack_check_flags_a_certified_radius_above_the_attack_radius():
    attacked = torch.tensor([0.0, 0.10, 0.25, 0.4]).double()  # float32 values, as radii are
    attacked[3] = EPS_MAX  # a sample never flipped: the cap itself
    sound = attack_check(torch.tensor([0.0, 0.08, 0.25, 0.4]), attacked, EPS_MAX)
    assert sound["violations"] == 0 and "worst" not in sound
    assert sound["acr_attack"] == pytest.approx(0.1875)
    assert sound["gap"] == pytest.approx(0.005)
    # float32(0.4) is a hair above 0.4: a certificate at the cap is no violation
    capped = attack_check(torch.tensor([0.0, 0.1, 0.25, EPS_MAX]), attacked, EPS_MAX)
    assert capped["violations"] == 0
    fake = torch.tensor([0.0, 0.12, 0.3, 0.4])  # two certified radii above the attack radii
    check = attack_check(fake, attacked, EPS_MAX)
    assert check["violations"] == 2 and check["violating_samples"] == [1, 2]
    assert check["worst"]["sample"] == 2
    assert check["worst"]["certified"] == pytest.approx(0.3)
    assert check["worst"]["attack"] == pytest.approx(0.25)


@pytest.mark.train
def test_certify_attack_radii_bound_the_certified_radii_and_both_acrs_are_printed(run, capsys):
    argv = ["certify", str(run), "--bound", "crown", "--limit", "30", "--pgd-steps", "0"]
    argv += ["--attack", "--attack-restarts", "2", "--attack-iterations", "8", "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "ACR (certified)" in printed and "ACR (attack)" in printed and "ACR gap" in printed
    assert "0 of 30 attack radii below the certified" in printed
    metrics = json.loads((run / "certify_crown.json").read_text())
    certified = torch.load(run / "certify_crown.radii.pt")
    attacked = torch.load(run / "certify_crown.attack_radii.pt")
    assert attacked.shape == certified.shape == (30,)
    assert torch.all(attacked >= certified.double().clamp(max=EPS_MAX))
    assert (attacked > 0).any() and (attacked < EPS_MAX).any()  # the attack did flip samples
    assert (certified > 0).any()  # ... some of them certified: the order is no empty claim
    assert metrics["acr_attack"] == pytest.approx(attacked.mean().item())
    assert metrics["acr_gap"] == pytest.approx(metrics["acr_attack"] - metrics["acr"], abs=1e-6)
    check = metrics["attack_check"]
    assert check["violations"] == 0 and check["restarts"] == 2 and check["iterations"] == 8
    assert check["steps"] == AttackSearch().steps


@pytest.mark.train
def test_certify_says_unsound_and_exits_1_when_an_attack_radius_is_below(
    run, tmp_path, capsys, monkeypatch
):
    """A (fake) attack that flips every sample at ε = 1e-4 contradicts every larger
    certified radius: one error line on stderr, exit status 1, the samples in the JSON."""

    def tiny_radii(model, x, y, eps_max, search, generator):
        return torch.full((x.shape[0],), 1e-4, dtype=torch.float64)

    monkeypatch.setattr(acert.workflows.certify.runs, "attack_radii", tiny_radii)
    out = tmp_path / "m.json"
    argv = ["certify", str(run), "--limit", "30", "--pgd-steps", "0", "--attack", "--quiet"]
    assert main([*argv, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("acert: error: UNSOUND: ")
    certified = torch.load(tmp_path / "m.radii.pt")
    above = torch.nonzero(certified > 1e-4).flatten().tolist()
    assert above and f"{len(above)} of 30 samples have an attack radius below" in err
    check = json.loads(out.read_text())["attack_check"]
    assert check["violating_samples"] == above
    assert check["worst"]["sample"] == int(certified.argmax())


@pytest.mark.train
def test_best_of_radii_are_the_elementwise_max_and_the_wins_add_up(run, capsys):
    common = ["--limit", "30", "--pgd-steps", "0", "--quiet"]
    radii, certified = {}, {}
    for bound in ("ibp", "crown", "best:crown,ibp"):
        out = run / f"best-{bound.replace(':', '-')}.json"
        assert main(["certify", str(run), "--bound", bound, *common, "--out", str(out)]) == 0
        metrics = json.loads(out.read_text())
        radii[bound] = torch.load(out.with_suffix(".radii.pt"))
        certified[bound] = metrics["certified_accuracy"]
    assert metrics["bound"] == "best-ibp+crown"
    assert torch.equal(radii["best:crown,ibp"], torch.maximum(radii["ibp"], radii["crown"]))
    won = metrics["best_of"]["won"]
    assert sum(won.values()) == 30 and metrics["best_of"]["bounds"] == ["ibp", "crown"]
    assert won["crown"] == int((radii["crown"] > radii["ibp"]).sum())
    assert won["ibp"] == int((radii["ibp"] > radii["crown"]).sum())
    assert won["tie"] == int((radii["ibp"] == radii["crown"]).sum())
    assert metrics["best_of"]["acr"]["ibp"] == pytest.approx(radii["ibp"].mean().item())
    for eps, accuracy in certified["best:crown,ibp"].items():
        assert accuracy >= max(certified["ibp"][eps], certified["crown"][eps])
        # certified at eps by some bound: at least every sample whose best radius reaches eps
        assert accuracy >= (radii["best:crown,ibp"] >= float(eps)).float().mean().item()
    printed = capsys.readouterr().out
    assert "best radius from" in printed and "ACR per bound" in printed


@pytest.mark.train
def test_bound_best_takes_every_bound_and_writes_certify_best(run, capsys):
    argv = ["certify", str(run), "--bound", "best", "--limit", "20", "--pgd-steps", "0"]
    assert main([*argv, "--quiet", "--check-float64"]) == 0
    metrics = json.loads((run / "certify_best.json").read_text())
    assert metrics["bound"] == "best" and metrics["best_of"]["bounds"] == list(parse_bound("best"))
    assert metrics["float64_check"]["violations"] == 0
    radii = torch.load(run / "certify_best.radii.pt")
    assert metrics["acr"] == pytest.approx(radii.mean().item(), rel=1e-5)
    assert metrics["acr"] >= max(metrics["best_of"]["acr"].values()) - 1e-7


def test_best_of_counts_strict_wins_and_ties():
    summary = best_of(
        {
            "ibp": torch.tensor([0.0, 0.1, 0.3, 0.4]),
            "crown": torch.tensor([0.0, 0.2, 0.1, 0.4]),
        }
    )
    assert summary["won"] == {"ibp": 1, "crown": 1, "tie": 2}
    assert summary["acr"] == pytest.approx({"ibp": 0.2, "crown": 0.175})


def test_parse_bound():
    assert parse_bound("crown") == ("crown",)
    assert parse_bound("best") == ("ibp", "crown-ibp", "crown")
    assert parse_bound("best:crown, ibp") == ("ibp", "crown")
    with pytest.raises(AcertError, match="a best-of needs two or more"):
        parse_bound("best:ibp")
    with pytest.raises(AcertError, match="unknown bound 'foo' in --bound best:ibp,foo"):
        parse_bound("best:ibp,foo")
    with pytest.raises(AcertError, match="unknown bound 'crown,ibp'; choose one of"):
        parse_bound("crown,ibp")


@pytest.mark.train
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--bound", "best:ibp"], "a best-of needs two or more"),
        (["--attack-steps", "5"], "--attack-steps only applies to attack radii; add --attack"),
        (["--attack", "--attack-restarts", "0"], "--attack-restarts must be a whole number >= 1"),
    ],
)
def test_bad_attack_and_best_options_are_one_line_errors(run, argv, message, capsys):
    assert main(["certify", str(run), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("acert: error: ") and message in err and err.count("\n") == 1


def test_study_table_and_tradeoff_show_the_attack_acr_where_present(tmp_path):
    from acert.records.plots import plot_tradeoff
    from acert.records.study import markdown_table, study_table
    from tests.records.test_plots import make_run

    study = tmp_path / "study"
    runs = [
        make_run(study, "acert", {"kappa": k}, c, a)
        for k, c, a in ((0.0, 0.8, 0.1), (0.5, 0.9, 0.05))
    ]
    assert "ACR attack" not in markdown_table(study_table(study))
    path = runs[1] / "certify_crown.json"
    metrics = json.loads(path.read_text())
    path.write_text(json.dumps({**metrics, "acr_attack": 0.2, "acr_gap": 0.2 - metrics["acr"]}))
    rows = study_table(study)
    assert rows[1]["crown_acr_attack"] == 0.2 and rows[1]["crown_acr_attack_pct"] == 50
    assert "crown_acr_attack" not in rows[0]
    header, _, first, second = markdown_table(rows).splitlines()[:4]
    column = header.split(" | ").index("ACR attack CROWN")
    assert second.split(" | ")[column] == "0.2" and first.split(" | ")[column] == ""
    assert plot_tradeoff(rows, tmp_path / "crown.png", bound="crown").intervals == [1]
    assert plot_tradeoff(rows, tmp_path / "ibp.png", bound="ibp").intervals == []


def test_plot_draws_a_best_of_certificate(tmp_path, capsys):
    from tests.records.test_plots import make_run

    study = tmp_path / "study"
    for kappa, clean, acr in ((0.0, 0.8, 0.1), (0.5, 0.9, 0.05)):
        run = make_run(study, "acert", {"kappa": kappa}, clean, acr)
        metrics = json.loads((run / "certify_crown.json").read_text())
        (run / "certify_best.json").write_text(json.dumps({**metrics, "bound": "best"}))
        torch.save(torch.load(run / "certify_crown.radii.pt"), run / "certify_best.radii.pt")
    assert main(["plot", str(study), "--bound", "best"]) == 0
    assert (study / "plots-best" / "tradeoff.png").is_file()
    assert main(["plot", str(study), "--bound", "best:ibp"]) == 2
    assert "a best-of needs two or more" in capsys.readouterr().err


@pytest.mark.train
def test_certify_run_takes_settings_objects_and_caps_crown_memory(run, tmp_path, monkeypatch):
    """The Python form of acert certify: run_settings (defaults from the run) and a
    DataSelection; crown_memory_mib caps each CROWN backward chunk of the evaluation."""
    settings = run_settings(run, "crown", pgd_steps=0)
    assert settings.eps_max == EPS_MAX and settings.bounds == ("crown",)
    data = DataSelection(limit=20)
    plain = certify_run(run, settings, data, out=tmp_path / "plain.json")
    budgets, real = [], acert.bounds.crown.memory_budget

    def recording(elements):
        budgets.append(elements)
        return real(elements)

    monkeypatch.setattr(acert.bounds.crown, "memory_budget", recording)
    capped_settings = run_settings(run, "crown", pgd_steps=0, crown_memory_mib=0.01)
    capped = certify_run(run, capped_settings, data, out=tmp_path / "capped.json")
    assert budgets == [int(0.01 * 2**20 / 4)]  # float32 inputs: 4 bytes per element
    assert plain.metrics["n"] == capped.metrics["n"] == 20
    assert plain.metrics["bound"] == "crown" and plain.metrics["pgd_accuracy"] == {}
    torch.testing.assert_close(capped.radii, plain.radii, atol=1e-4, rtol=0)
    wrong_kind = r"data must be an acert\.workflows\.certify\.runs\.DataSelection"
    with pytest.raises(AcertError, match=wrong_kind):
        certify_run(run, settings, {"limit": 20})


@pytest.mark.train
def test_a_cascade_gives_the_best_of_radii_for_fewer_crown_evaluations(run, monkeypatch):
    """--cascade: CROWN-IBP and CROWN only where IBP (and CROWN-IBP) leave a sample below the
    cap and can beat the radius reached; each sample's radius is the full best-of's to the
    search's tolerance, every one holds in float64 and no attack radius lies below it."""
    crown_margins, crown_rows = acert.bounds.crown.crown_margins, []

    def counted(model, box, y, stats=None, intermediate="crown", **kwargs):
        if intermediate == "crown":
            crown_rows[-1] += box.lower.shape[0]
        return crown_margins(model, box, y, stats, intermediate=intermediate, **kwargs)

    monkeypatch.setattr(acert.bounds.crown, "crown_margins", counted)
    common = ["--bound", "best:ibp,crown-ibp,crown", "--limit", "30", "--pgd-steps", "0"]
    metrics, radii = {}, {}
    for name, extra in (("full", []), ("cascade", ["--cascade", "--check-float64", "--attack"])):
        out = run / f"{name}.json"
        crown_rows.append(0)
        assert main(["certify", str(run), *common, *extra, "--quiet", "--out", str(out)]) == 0
        metrics[name] = json.loads(out.read_text())
        radii[name] = torch.load(out.with_suffix(".radii.pt"))
    assert torch.allclose(radii["cascade"], radii["full"], rtol=0, atol=1e-3 * EPS_MAX)
    assert metrics["cascade"]["acr"] == pytest.approx(metrics["full"]["acr"], rel=1e-3)
    full, cascade = crown_rows[0], crown_rows[1]
    assert 0 < cascade <= full + 30  # at most one more per sample: the one at the radius to beat
    assert metrics["cascade"]["float64_check"]["violations"] == 0
    assert metrics["cascade"]["attack_check"]["violations"] == 0
    certified = metrics["cascade"]["certified_accuracy"]
    assert certified == metrics["full"]["certified_accuracy"]


def test_a_cascade_spends_one_evaluation_where_a_bound_cannot_beat_the_radius(monkeypatch):
    """On a linear model IBP and CROWN are exact and equal: CROWN cannot beat IBP's radius, so
    the cascade evaluates it once on each sample IBP leaves in (0, cap) and never on one at the
    cap or at 0, and the radii are IBP's."""
    generator = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(3, 12, generator=generator), torch.randn(3, generator=generator)
    model, x = linear_model(weight, bias), torch.rand(40, 12, generator=generator)
    y = model(x).argmax(1)
    y[:4] = (y[:4] + 1) % 3  # four misclassified samples: radius 0
    crown_margins, crown_rows = acert.bounds.crown.crown_margins, [0]

    def counted(model, box, y, stats=None, intermediate="crown", **kwargs):
        crown_rows[0] += box.lower.shape[0] if intermediate == "crown" else 0
        return crown_margins(model, box, y, stats, intermediate=intermediate, **kwargs)

    monkeypatch.setattr(acert.bounds.crown, "crown_margins", counted)
    eps_max = 0.05
    found, _ = cascade_radii(model, x, y, eps_max, ("ibp", "crown"))
    ibp = radius_search(model, x, y, eps_max, "ibp").radius
    assert torch.equal(found["ibp"], ibp)
    inside = int(((ibp > 0) & (ibp < eps_max)).sum())
    assert (ibp == 0).sum() >= 4 and (ibp >= torch.tensor(eps_max)).sum() > 0 and inside > 0
    assert crown_rows[0] == inside and not found["crown"].any()


@pytest.mark.train
def test_eval_seed_draws_one_subset_for_runs_of_every_seed(run, tmp_path):
    """eval_seed (and acert certify --eval-seed) fixes the images of --limit / eval_limit,
    whatever the run's seed; unset, the run's seed draws them as before."""

    drawn = [_test_set(tiny_run(seed=seed, eval_limit=30, eval_seed=7)).floats() for seed in (0, 1)]
    expected = stratified_subset(load_imageset("mnist5k", "test"), 30, seed=7)
    assert torch.equal(drawn[0], drawn[1]) and torch.equal(drawn[0], expected.floats())
    default = _test_set(tiny_run(seed=1, eval_limit=30))
    by_run_seed = stratified_subset(load_imageset("mnist5k", "test"), 30, seed=1)
    assert torch.equal(default.floats(), by_run_seed.floats())
    settings = run_settings(run, pgd_steps=0)
    for seed in (3, 4):
        out = tmp_path / f"seed{seed}.json"
        result = certify_run(run, settings, DataSelection(limit=30, seed=seed), out=out)
        subset = stratified_subset(load_imageset("mnist5k", "test"), 30, seed=seed)
        alone = radius_search(load(run).eval(), subset.floats(), subset.labels, EPS_MAX)
        assert torch.equal(result.radii, alone.radius)
    with pytest.raises(AcertError, match="eval_seed"):
        DataSelection(limit=30, seed=-1)
