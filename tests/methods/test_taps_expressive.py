"""CC-IBP, EXP-IBP (docs/METHOD.md (M18), (M19)), TAPS and STAPS ((M20), (M21)): each loss against
its formula and the properties that tie it to IBP and to PGD training, on the tiny network of
test_baselines; then short real runs that train, resume and certify with each of them."""

import copy
import sys

import pytest
import torch
from torch import nn

from acert.bounds import Interval, clean_forward, input_box
from acert.bounds.clean_pass import forward_with_stats
from acert.config import TrainConfig, resolve
from acert.foundation.errors import ConfigError
from acert.methods import (
    CCIBP,
    EXPIBP,
    IBP,
    STAPS,
    TAPS,
    Batch,
    PGDTraining,
    Step,
    TrainingAttack,
)
from acert.methods.base import ibp_pass, robust_cross_entropy
from acert.methods.cc_ibp import logit_margins
from acert.methods.exp_ibp import global_mean, log_product, robust_cross_entropies
from acert.methods.taps import connect, taps_objective, taps_pass
from acert.records.runs import RunDir
from acert.workflows.train.run import run
from tests.kit.methods import loss_of, make_batch, method_run, small_net, step
from tests.kit.processes import torchrun

NEW_METHODS = ("cc-ibp", "exp-ibp", "taps", "staps")


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """Tiny tensors: one intra-op thread (see the ``single_thread`` fixture)."""


def no_warmup() -> Step:
    return step(warmup=False)


# --- CC-IBP and EXP-IBP ------------------------------------------------------------------------


@pytest.mark.parametrize("method", [CCIBP, EXPIBP])
def test_alpha_one_is_the_ibp_loss_and_alpha_zero_pgd_training(method):
    model, batch, attack = small_net(), make_batch(), TrainingAttack(steps=4)
    for at in (step(), no_warmup()):
        ibp = loss_of(IBP(kappa=0.0), model, batch, at)
        assert loss_of(method(alpha=1.0), model, batch, at) == pytest.approx(ibp, rel=1e-6)
    pgd = loss_of(PGDTraining(attack=attack), model, batch, no_warmup(), seed=7)
    got = loss_of(method(alpha=0.0, attack=attack), model, batch, no_warmup(), seed=7)
    assert got == pytest.approx(pgd, rel=1e-5)


def test_cc_ibp_is_the_robust_cross_entropy_of_the_combined_margins():
    model, batch, at, alpha = small_net(), make_batch(), no_warmup(), 0.3
    attack = TrainingAttack(steps=4)
    reference = copy.deepcopy(model)
    torch.manual_seed(5)  # the method's passes in the same order: clean, IBP, then the attack
    _, stats = clean_forward(reference, batch.x)
    x_adv = attack(reference, batch.x, batch.y, at.eps)
    adv = logit_margins(forward_with_stats(reference, x_adv, stats), batch.y)
    terms = CCIBP(alpha=alpha, attack=attack)
    torch.manual_seed(5)
    got = terms.loss(copy.deepcopy(model), batch, at)
    lower = ibp_margins(model, batch, at.eps)
    expected = robust_cross_entropy(alpha * lower + (1 - alpha) * adv).item()
    assert got.loss.item() == pytest.approx(expected, rel=1e-5)
    # margins at x_adv lie above their IBP bounds: L_adv <= L_CC <= α·L_IBP + (1-α)·L_adv
    loss_ibp, loss_adv = got.metrics["loss_rob"], got.metrics["loss_adv"]
    assert loss_adv < got.loss.item() < alpha * loss_ibp + (1 - alpha) * loss_adv


def ibp_margins(model: nn.Sequential, batch: Batch, eps: float) -> torch.Tensor:
    """IBP margin lower bounds of the train-mode network with the clean batch's statistics."""
    reference = copy.deepcopy(model)
    _, stats = clean_forward(reference, batch.x)
    return ibp_pass(reference, input_box(batch.x, eps), batch.y, stats).margins.detach()


def test_exp_ibp_is_the_weighted_geometric_mean_of_the_two_losses():
    model, batch = small_net(), make_batch()
    terms = EXPIBP(alpha=0.3, attack=TrainingAttack(steps=4)).loss(model, batch, no_warmup())
    loss_ibp, loss_adv = terms.metrics["loss_rob"], terms.metrics["loss_adv"]
    assert loss_adv < loss_ibp
    assert terms.loss.item() == pytest.approx(loss_adv**0.7 * loss_ibp**0.3, rel=1e-5)
    assert loss_adv < terms.loss.item() < 0.3 * loss_ibp + 0.7 * loss_adv  # AM-GM


def test_exp_ibp_has_finite_gradients_when_a_loss_underflows_to_zero():
    first = torch.tensor(0.0, requires_grad=True)
    second = torch.tensor(2.0, requires_grad=True)
    value = log_product(first, second, 0.5)
    value.backward()
    assert value.item() == pytest.approx(0.0, abs=1e-15)
    assert torch.isfinite(first.grad) and torch.isfinite(second.grad)


# --- TAPS ---------------------------------------------------------------------------------------


def test_the_connector_passes_the_gradient_to_the_nearer_bound_linearly():
    box = Interval.from_bounds(torch.zeros(1, 1), torch.ones(1, 1))
    lower, upper = box.lower.requires_grad_(), box.upper.requires_grad_()
    points = torch.tensor([[[1.0], [0.75], [0.1], [0.0]]])  # (B=1, N=4, D=1)
    linked = connect(Interval.from_bounds(lower, upper), points, c=0.5)
    assert torch.equal(linked, points)
    weights = torch.tensor([[[1.0], [10.0], [100.0], [1000.0]]])
    (linked * weights).sum().backward()
    # to the upper bound: 1 at it, 0.5 at 3/4 of the width (c = 0.5); to the lower one: 0.8 at
    # 0.1, 1 at it
    assert upper.grad.item() == pytest.approx(1.0 + 10.0 * 0.5, abs=1e-3)
    assert lower.grad.item() == pytest.approx(100.0 * 0.8 + 1000.0, abs=1e-3)


def taps_setup(head: int = 4, eps: float = 0.05, steps: int = 10, fixed_stats: bool = False):
    model, batch = small_net(), make_batch(12)
    logits, stats = clean_forward(model, batch.x, update_running_stats=False)
    if fixed_stats:  # no gradient through the batch-norm statistics
        stats = {layer: (mean.detach(), var.detach()) for layer, (mean, var) in stats.items()}
    torch.manual_seed(0)
    result = taps_pass(
        model, input_box(batch.x, eps), batch.y, stats, batch.x, head, TrainingAttack(steps)
    )
    return model, batch, logits, stats, result


def test_the_latent_estimate_lies_between_the_ibp_bound_and_the_clean_margin():
    model, batch, logits, stats, result = taps_setup()
    clean = logit_margins(logits, batch.y)
    estimates, lower = result.estimates.detach(), result.bounds.margins.detach()
    assert torch.all(lower <= estimates + 1e-5) and torch.all(estimates <= clean + 1e-5)
    assert (estimates < clean - 1e-3).float().mean() > 0.5  # the search does move
    assert (lower < estimates - 1e-3).float().mean() > 0.5  # IBP is looser than the estimate
    # PGD beats random points of the latent box, class by class
    head, box = model[-4:], result.latent
    generator = torch.Generator().manual_seed(1)
    lowest = torch.full_like(estimates, float("inf"))
    with torch.no_grad():
        for _ in range(50):
            noise = torch.rand(box.shape, generator=generator)
            point = box.lower + noise * (box.upper - box.lower)
            margins = logit_margins(forward_with_stats(head, point, stats), batch.y)
            lowest = torch.minimum(lowest, margins)
    assert torch.all(estimates <= lowest + 1e-4)


@pytest.mark.parametrize("head", [1, 3, 4, 6])
def test_the_split_ibp_pass_is_the_ibp_pass_of_the_whole_network(head):
    model, batch, _, stats, result = taps_setup(head=head)
    whole = ibp_pass(model, input_box(batch.x, 0.05), batch.y, stats)
    assert torch.allclose(result.bounds.margins, whole.margins, atol=1e-5)
    assert len(result.bounds.preactivations) == len(whole.preactivations) == 2
    for got, expected in zip(result.bounds.preactivations, whole.preactivations, strict=True):
        assert torch.allclose(got.lower, expected.lower, atol=1e-5)
        assert torch.allclose(got.upper, expected.upper, atol=1e-5)


def test_a_linear_head_makes_the_estimate_the_exact_ibp_bound():
    """On one linear layer IBP is exact and PGD reaches the minimising vertex."""
    _, _, _, _, result = taps_setup(head=1)
    estimates, lower = result.estimates.detach(), result.bounds.margins.detach()
    assert torch.allclose(estimates, lower, atol=1e-5)


def test_the_connector_trains_the_feature_extractor():
    model, _, _, _, result = taps_setup(fixed_stats=True)
    first_conv = model[1].weight
    (grad,) = torch.autograd.grad(robust_cross_entropy(result.estimates), first_conv)
    assert grad.abs().sum() > 1e-3  # only through the connector: the latent points are detached


def test_taps_objective_is_the_product_with_the_taps_gradient_scaled():
    estimates = torch.tensor([[0.5, -0.2], [1.0, 0.3]], requires_grad=True)
    margins = torch.tensor([[-0.5, -1.0], [0.2, -0.4]], requires_grad=True)
    loss, loss_taps, loss_ibp = taps_objective(estimates, margins, grad_scale=3.0)
    assert loss.item() == pytest.approx(loss_taps.item() * loss_ibp.item())
    loss.backward()
    plain_estimates, plain_margins = estimates.detach().requires_grad_(), margins.detach()
    (d_taps,) = torch.autograd.grad(robust_cross_entropy(plain_estimates), plain_estimates)
    (d_ibp,) = torch.autograd.grad(
        robust_cross_entropy(plain_margins.requires_grad_()), plain_margins
    )
    assert torch.allclose(estimates.grad, 3.0 * loss_ibp.item() * d_taps)
    assert torch.allclose(margins.grad, loss_taps.item() * d_ibp)


def test_taps_loss_is_the_product_of_its_two_terms():
    model, batch = small_net(), make_batch()
    terms = TAPS(grad_scale=2.0).loss(model, batch, no_warmup())
    product = terms.metrics["loss_taps"] * terms.metrics["loss_rob"]
    assert terms.loss.item() == pytest.approx(product, rel=1e-6)
    assert terms.metrics["loss_taps"] < terms.metrics["loss_rob"]


def test_staps_small_box_gives_a_smaller_ibp_loss_than_the_ball():
    model, batch, at = small_net(), make_batch(), no_warmup()
    torch.manual_seed(0)
    whole = TAPS().loss(copy.deepcopy(model), batch, at)
    torch.manual_seed(0)
    small = STAPS(lam=0.2).loss(copy.deepcopy(model), batch, at)
    assert small.metrics["loss_rob"] < whole.metrics["loss_rob"]
    box, centre = STAPS(lam=0.2).box(copy.deepcopy(model), batch, at.eps)
    assert torch.all(box.radius <= 0.2 * at.eps + 1e-7)
    assert torch.equal(centre, box.centre)


def test_a_head_as_long_as_the_network_is_a_config_error():
    model, batch = small_net(), make_batch()
    with pytest.raises(ConfigError, match=r"taps_head must lie in \[1, 8\]"):
        TAPS(head=len(model)).loss(model, batch, no_warmup())
    with pytest.raises(ConfigError, match="taps_head"):  # already in the standard phase
        STAPS(head=len(model)).loss(model, batch, step(eps=0.0))
    with pytest.raises(ConfigError, match="taps_head"):
        resolve(TrainConfig(method="taps", taps_head=0))
    with pytest.raises(ConfigError, match="taps_connector"):
        resolve(TrainConfig(method="taps", taps_connector=0.0))
    with pytest.raises(ConfigError, match="cc_alpha"):
        resolve(TrainConfig(method="cc-ibp", cc_alpha=1.5))


# --- two processes -------------------------------------------------------------------------------


@pytest.mark.train
def test_product_losses_on_two_processes_are_the_one_process_losses():
    """L_TAPS·L_IBP and L_adv^(1-α)·L_IBP^α of global-batch means: two processes holding 5 and 6
    of 11 samples, weighting their losses and averaging their gradients as training does, get
    one process's loss and gradients (a product of per-process means would not)."""
    done = torchrun("-m", "tests.methods.test_taps_expressive", "product-losses")
    assert done.stdout.count("product losses ok") == 2


def _product_losses(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """TAPS's objective plus EXP-IBP's, of per-sample margins (11, 3)."""
    taps, _, _ = taps_objective(first, second, grad_scale=3.0)
    losses = (robust_cross_entropies(first), robust_cross_entropies(second))
    return taps + log_product(global_mean(losses[0]), global_mean(losses[1]), 0.3)


def _product_losses_worker() -> None:
    import torch.distributed as dist

    from acert.foundation.process_group import World, shard

    generator = torch.Generator().manual_seed(2)
    first = torch.randn(11, 3, generator=generator)
    second = first - torch.rand(11, 3, generator=generator)
    one = [first.clone().requires_grad_(), second.clone().requires_grad_()]
    expected = _product_losses(*one)  # before the group exists: one process
    expected.backward()
    dist.init_process_group("gloo")
    rows, weight = shard(11, World(dist.get_rank(), 2))
    mine = [first.clone().requires_grad_(), second.clone().requires_grad_()]
    loss = _product_losses(mine[0][rows], mine[1][rows])
    (weight * loss).backward()
    for leaf in mine:
        dist.all_reduce(leaf.grad)
        leaf.grad /= 2
    dist.destroy_process_group()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    for got, reference in zip(mine, one, strict=True):
        assert torch.allclose(got.grad, reference.grad, rtol=1e-5, atol=1e-7)
    print("product losses ok", flush=True)


# --- short real runs ----------------------------------------------------------------------------


def tiny(method: str) -> TrainConfig:
    return method_run(method, train_limit=120, batch_size=40, cert_eps=[0.05], pgd_restarts=2)


class InterruptError(Exception):
    pass


@pytest.mark.train
@pytest.mark.parametrize("method", NEW_METHODS)
def test_a_run_trains_resumes_to_the_same_weights_and_certifies(method, tmp_path):
    straight = run(tiny(method), out=tmp_path / "straight", progress=False, log=lambda _: None)

    def stop_after_second_epoch(line: str) -> None:
        if line.startswith("epoch 2/3"):
            raise InterruptError

    with pytest.raises(InterruptError):
        run(tiny(method), out=tmp_path / "resumed", progress=False, log=stop_after_second_epoch)
    resumed = run(
        tiny(method), out=tmp_path / "resumed", resume=True, progress=False, log=lambda _: None
    )
    assert [row["loss"] for row in resumed.history] == pytest.approx(
        [row["loss"] for row in straight.history], rel=1e-5
    )
    for a, b in zip(
        straight.model.state_dict().values(), resumed.model.state_dict().values(), strict=True
    ):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)
    assert straight.history[-1]["loss_rob"] > 0
    assert RunDir(tmp_path / "resumed").test_metrics_path.is_file()
    assert resumed.test.n == 40 and 0 <= resumed.test.acr <= 0.1
    assert resumed.test.acr == pytest.approx(straight.test.acr, rel=1e-5)


if __name__ == "__main__":
    {"product-losses": _product_losses_worker}[sys.argv[1]]()
