"""The baseline training methods of docs/METHOD.md, "Baselines", and the smoke tests every
registered method gets: tiny networks with batch-norm, synthetic data, fixed steps."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from acert.bounds import clean_forward, input_box
from acert.config import TrainConfig
from acert.foundation.errors import ConfigError
from acert.methods import (
    CCIBP,
    CROWNIBP,
    EXPIBP,
    IBP,
    MTLIBP,
    SABR,
    STAPS,
    TAPS,
    PGDTraining,
    TrainingAttack,
    WarmupRegularizer,
    create_method,
    list_methods,
    sabr_box,
)
from acert.methods import crown_ibp as crown_ibp_module
from acert.methods.base import certified_objective, ibp_pass
from tests.kit.methods import loss_of, make_batch, small_net, step

BASELINES = tuple(name for name in list_methods() if name not in ("acert", "standard"))
"""Every registered method but ACERT and standard training: a new one is tested here at once."""


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """Tiny tensors: one intra-op thread (see the ``single_thread`` fixture)."""


def config(method: str, **overrides) -> TrainConfig:
    knobs = {
        "kappa": 0.3,
        "sabr_lambda": 0.25,
        "mtl_alpha": 0.7,
        "cc_alpha": 0.6,
        "exp_alpha": 0.4,
        "taps_head": 3,  # batch-norm, ReLU, linear: split between a linear layer and its BN
        "taps_grad_scale": 3.0,
        "taps_connector": 0.4,
        "lambda_tight": 0.2,
        "lambda_relu": 0.1,
        "pgd_steps": 3,
        "pgd_step_size": 0.01,
        "pgd_restarts": 2,
    }
    return TrainConfig(method=method, **{**knobs, **overrides})


def batchnorm_buffers(model: nn.Module) -> list[torch.Tensor]:
    return [
        b
        for m in model.modules()
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)
        for b in (m.running_mean, m.running_var, m.num_batches_tracked)
    ]


# --- every registered method ------------------------------------------------------------------


def test_registry_holds_the_baselines():
    ten = {"pgd", "ibp", "crown-ibp", "sabr", "mtl-ibp", "cc-ibp", "exp-ibp", "taps", "staps"}
    assert ten <= set(BASELINES) and {"acert", "standard"} <= set(list_methods())


@pytest.mark.parametrize("name", list_methods())
def test_a_few_optimisation_steps_lower_the_loss(name):
    torch.manual_seed(0)
    method, model, batch = create_method(config(name)), small_net(), make_batch()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for _ in range(30):
        terms = method.loss(model, batch, step())
        optimizer.zero_grad()
        terms.loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        optimizer.step()
        losses.append(terms.loss.item())
    assert sum(losses[-3:]) < sum(losses[:3]), losses


@pytest.mark.parametrize("name", list_methods())
def test_eps_zero_is_standard_training_plus_the_warmup_regularisers(name):
    """While ε_s = 0: L_std, and for the certified methods during warm-up the regularisers at
    full weight on the IBP intervals of radius 1e-6 (docs/METHOD.md, "Training loss" 3 and 5)."""
    model, batch = small_net(), make_batch()
    clean = F.cross_entropy(copy.deepcopy(model)(batch.x), batch.y).item()
    method = create_method(config(name))
    after_warmup = loss_of(method, model, batch, step(eps=0.0, warmup=False))
    assert after_warmup == pytest.approx(clean, rel=1e-6)
    during = method.loss(copy.deepcopy(model), batch, step(eps=0.0, warmup=True))
    if name in ("standard", "pgd"):
        assert during.loss.item() == pytest.approx(clean, rel=1e-6)
        return
    trained = copy.deepcopy(model)
    _, stats = clean_forward(trained, batch.x)
    bounds = ibp_pass(trained, input_box(batch.x, 1e-6), batch.y, stats)
    reg = WarmupRegularizer(0.2, 0.1)(trained, bounds.box, bounds.preactivations, stats).item()
    assert reg > 0.01
    assert during.metrics["loss_reg"] == pytest.approx(reg, rel=1e-5)
    assert during.loss.item() == pytest.approx(clean + reg, rel=1e-5)
    during.loss.backward()  # the regularisers train the network in the standard epoch too


@pytest.mark.parametrize("name", list_methods())
def test_only_the_clean_pass_moves_the_batchnorm_running_statistics(name):
    model, batch = small_net(), make_batch()
    with torch.no_grad():  # non-trivial running statistics, as after some training
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
    clean, trained = copy.deepcopy(model), copy.deepcopy(model)
    clean(batch.x)
    create_method(config(name)).loss(trained, batch, step())
    assert trained.training
    for got, expected in zip(batchnorm_buffers(trained), batchnorm_buffers(clean), strict=True):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("name", list_methods())
def test_method_state_round_trips(name):
    method = create_method(config(name))
    assert method.name == name
    method.load_state_dict(method.state_dict())


# --- configuration --------------------------------------------------------------------------


def test_create_method_passes_the_config_knobs():
    regularizer = WarmupRegularizer(0.2, 0.1)
    attack = TrainingAttack(steps=3, step_size=0.01, restarts=2)
    ibp, crown = create_method(config("ibp")), create_method(config("crown-ibp"))
    sabr, mtl, pgd = (create_method(config(n)) for n in ("sabr", "mtl-ibp", "pgd"))
    assert isinstance(ibp, IBP) and (ibp.kappa, ibp.regularizer) == (0.3, regularizer)
    assert isinstance(crown, CROWNIBP) and (crown.kappa, crown.regularizer) == (0.3, regularizer)
    assert isinstance(sabr, SABR) and (sabr.lam, sabr.attack, sabr.regularizer) == (
        0.25,
        attack,
        regularizer,
    )
    assert isinstance(mtl, MTLIBP) and (mtl.alpha, mtl.attack) == (0.7, attack)
    assert isinstance(pgd, PGDTraining) and pgd.attack == attack
    cc, exp, taps, staps = (
        create_method(config(n)) for n in ("cc-ibp", "exp-ibp", "taps", "staps")
    )
    assert isinstance(cc, CCIBP) and (cc.alpha, cc.attack, cc.regularizer) == (
        0.6,
        attack,
        regularizer,
    )
    assert isinstance(exp, EXPIBP) and (exp.alpha, exp.attack) == (0.4, attack)
    for method in (taps, staps):
        assert isinstance(method, TAPS) and (method.head, method.grad_scale) == (3, 3.0)
        assert (method.connector, method.attack, method.regularizer) == (0.4, attack, regularizer)
    assert isinstance(staps, STAPS) and staps.lam == 0.25


def test_unknown_method_is_a_one_line_config_error():
    with pytest.raises(ConfigError) as err:
        create_method(config("fgsm"))
    message = str(err.value)
    assert "\n" not in message and "'fgsm'" in message and "sabr" in message


def test_attack_settings_are_checked():
    with pytest.raises(ConfigError):
        create_method(config("pgd", pgd_restarts=0))
    with pytest.raises(ConfigError):
        TrainingAttack(step_size=-0.1)


# --- SABR's box -----------------------------------------------------------------------------


def test_sabr_box_lies_in_the_clipped_ball_with_half_width_at_most_lambda_eps():
    generator = torch.Generator().manual_seed(3)
    x = torch.rand(16, 1, 5, 5, generator=generator)
    x[0], x[1] = 0.0, 1.0  # pixels on the domain's bounds
    eps = torch.linspace(0.01, 0.3, 16)
    ball = input_box(x, eps)
    x_adv = ball.lower + torch.rand(x.shape, generator=generator) * (ball.upper - ball.lower)
    for lam in (0.0, 0.1, 0.4, 0.9):
        box = sabr_box(x, x_adv, eps, lam)
        assert torch.all(box.lower >= ball.lower - 1e-7) and torch.all(box.upper <= ball.upper)
        assert torch.all(box.lower >= 0) and torch.all(box.upper <= 1)
        assert torch.all(box.radius <= lam * eps.view(-1, 1, 1, 1) + 1e-7)


def test_sabr_box_is_centred_at_the_adversarial_point_away_from_the_borders():
    x = torch.full((2, 4), 0.5)
    x_adv = x + torch.tensor([[0.05, -0.05, 0.02, 0.0], [0.06, -0.06, 0.1, -0.1]])
    box = sabr_box(x, x_adv, 0.1, 0.4)
    # |x_adv - x| <= (1 - λ)·ε = 0.06: centred at x_adv; beyond, shifted back into the ball
    expected_centre = x_adv.clamp(0.44, 0.56)
    assert torch.allclose(box.centre, expected_centre, atol=1e-6)
    assert torch.allclose(box.radius, torch.full_like(x, 0.04), atol=1e-6)


def test_sabr_box_with_lambda_one_is_the_whole_clipped_ball():
    x = torch.tensor([[0.0, 0.05, 0.5, 0.97, 1.0]])
    x_adv = (x + torch.tensor([[0.1, -0.05, 0.07, 0.03, -0.1]])).clamp(0, 1)
    box, ball = sabr_box(x, x_adv, 0.1, 1.0), input_box(x, 0.1)
    assert torch.allclose(box.lower, ball.lower, atol=1e-7)
    assert torch.allclose(box.upper, ball.upper, atol=1e-7)


def test_sabr_box_keeps_its_width_at_a_pixel_bound():
    # ball [0, 0.1] at x = 0: a box of half-width 0.03 fits whole, shifted up from x_adv = 0
    box = sabr_box(torch.zeros(1, 1), torch.zeros(1, 1), 0.1, 0.3)
    assert box.lower.item() == pytest.approx(0.0, abs=1e-7)
    assert box.upper.item() == pytest.approx(0.06, abs=1e-7)


# --- IBP, CROWN-IBP, MTL-IBP, PGD -----------------------------------------------------------


def test_ibp_is_the_certified_objective_at_the_scheduled_eps():
    model, batch, at = small_net(), make_batch(), step()
    regularizer = WarmupRegularizer(0.5, 0.5)
    reference = copy.deepcopy(model)
    logits, stats = clean_forward(reference, batch.x)
    eps = torch.full((batch.x.shape[0],), at.eps)
    expected = certified_objective(reference, batch, eps, at, logits, stats, 0.25, regularizer)
    terms = IBP(kappa=0.25, regularizer=regularizer).loss(copy.deepcopy(model), batch, at)
    assert terms.loss.item() == pytest.approx(expected.loss.item(), rel=1e-6)
    assert terms.metrics["radius"] == pytest.approx(at.eps)
    assert "loss_reg" in terms.metrics


def test_ibp_with_kappa_one_is_the_clean_loss():
    model, batch = small_net(), make_batch()
    clean = F.cross_entropy(copy.deepcopy(model)(batch.x), batch.y).item()
    assert loss_of(IBP(kappa=1.0), model, batch, step(warmup=False)) == pytest.approx(clean)


def test_crown_ibp_weights_follow_the_eps_ramp():
    """Zhang et al. 2020: β (weight of CROWN-IBP) 1 -> 0 and κ 1 -> κ_end as ε_s ramps up."""
    method = CROWNIBP(kappa=0.2)
    assert method.beta(step(eps=0.01, eps_max=0.04)) == pytest.approx(0.75)
    assert method.beta(step(eps=0.04, eps_max=0.04)) == 0.0
    assert method.kappa_at(step(eps=0.01, eps_max=0.04)) == pytest.approx(0.8)
    assert method.kappa_at(step(eps=0.04, eps_max=0.04)) == pytest.approx(0.2)


def test_crown_ibp_mixes_the_crown_ibp_bound_with_weight_beta():
    model, batch, eps = small_net(), make_batch(8), 0.05
    _, stats = clean_forward(model, batch.x, update_running_stats=False)
    method = CROWNIBP()
    with torch.no_grad():
        ibp, _ = method.margins(model, batch, eps, stats, beta=0.0)
        crown, _ = method.margins(model, batch, eps, stats, beta=1.0)
        mixed, _ = method.margins(model, batch, eps, stats, beta=0.25)
    assert not torch.allclose(ibp, crown)
    assert torch.allclose(mixed, 0.25 * crown + 0.75 * ibp, atol=1e-6)


def test_crown_ibp_at_the_end_of_the_ramp_is_ibp_and_skips_the_backward_pass(monkeypatch):
    def no_crown(*args, **kwargs):
        raise AssertionError("CROWN-IBP pass at β = 0")

    monkeypatch.setattr(crown_ibp_module, "crown_margins", no_crown)
    model, batch = small_net(), make_batch()
    crown = CROWNIBP(kappa=0.2)
    ibp = IBP(kappa=0.2)
    end = step(eps=0.04, eps_max=0.04, warmup=False)
    assert loss_of(crown, model, batch, end) == pytest.approx(loss_of(ibp, model, batch, end))


def test_crown_ibp_margins_are_sound(margins_at):
    model, batch, eps = small_net(), make_batch(8), 0.05
    _, stats = clean_forward(model, batch.x, update_running_stats=False)
    with torch.no_grad():
        lower, _ = CROWNIBP().margins(model, batch, eps, stats, beta=1.0)
    ball = input_box(batch.x, eps)
    generator = torch.Generator().manual_seed(4)
    for _ in range(20):
        point = ball.lower + torch.rand(batch.x.shape, generator=generator) * 2 * ball.radius
        assert torch.all(lower <= margins_at(model, point, batch.y, stats) + 1e-5)


def test_mtl_ibp_with_alpha_one_is_the_ibp_robust_loss():
    model, batch, regularizer = small_net(), make_batch(), WarmupRegularizer(0.5, 0.5)
    mtl = MTLIBP(alpha=1.0, regularizer=regularizer)
    ibp = IBP(kappa=0.0, regularizer=regularizer)
    for at in (step(), step(warmup=False)):
        assert loss_of(mtl, model, batch, at) == pytest.approx(loss_of(ibp, model, batch, at))


def test_mtl_ibp_with_alpha_zero_is_pgd_training_and_mixes_the_two_losses():
    model, batch, at = small_net(), make_batch(), step(warmup=False)
    attack = TrainingAttack(steps=4)
    pgd = loss_of(PGDTraining(attack=attack), model, batch, at, seed=7)
    assert loss_of(MTLIBP(alpha=0.0, attack=attack), model, batch, at, seed=7) == pytest.approx(pgd)
    torch.manual_seed(7)
    terms = MTLIBP(alpha=0.3, attack=attack).loss(copy.deepcopy(model), batch, at)
    mixed = 0.3 * terms.metrics["loss_rob"] + 0.7 * terms.metrics["loss_adv"]
    assert terms.metrics["loss_adv"] == pytest.approx(pgd)
    assert terms.loss.item() == pytest.approx(mixed)


def test_pgd_adversarial_loss_is_above_the_clean_loss():
    model, batch = small_net().eval(), make_batch()
    torch.manual_seed(0)
    terms = PGDTraining(attack=TrainingAttack(steps=10)).loss(model, batch, step(eps=0.1))
    assert terms.loss.item() == terms.metrics["loss_adv"]
    assert terms.metrics["loss_adv"] > terms.metrics["loss_std"]
    assert terms.metrics["adv_acc"] <= (terms.logits.argmax(1) == batch.y).float().mean().item()
