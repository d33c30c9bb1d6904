"""Adaptive radii for every certified loss (acert.methods.adaptive; docs/METHOD.md, "Adaptive radii
for every certified loss"): ACERT's radii, the base's own loss at them, ACERT itself to the bit."""

from __future__ import annotations

import copy
import dataclasses
import sys

import pytest
import torch
import torch.nn.functional as F

from acert.bounds import clean_forward
from acert.config import TrainConfig, resolve, tiny_run
from acert.data import load_imageset, stratified_subset
from acert.foundation.errors import ConfigError
from acert.methods import (
    ACERT,
    ADAPTIVE_BASES,
    IBP,
    Adaptive,
    RadiusMemory,
    WarmupRegularizer,
    create_method,
    list_methods,
)
from acert.methods import adaptive as adaptive_module
from acert.radius import KnownBatch, radius_search
from acert.radius.attacks import pgd_attack
from acert.records.runs import RunDir
from acert.workflows.certify.runs import DataSelection, certify_run
from acert.workflows.train.run import run
from tests.kit.methods import make_batch, method_run, small_net, step
from tests.kit.processes import torchrun

KNOBS = {
    "kappa": 0.3,
    "sabr_lambda": 0.25,
    "mtl_alpha": 0.7,
    "cc_alpha": 0.6,
    "exp_alpha": 0.4,
    "taps_head": 3,
    "lambda_tight": 0.2,
    "lambda_relu": 0.1,
    "pgd_steps": 3,
    "pgd_restarts": 2,
}


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """Tiny tensors: one intra-op thread (see the ``single_thread`` fixture)."""


def config(method: str, **overrides) -> TrainConfig:
    return TrainConfig(method=method, **{**KNOBS, **overrides})


def grads_of(model) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def test_every_certified_base_has_its_adaptive_method_in_acert_list():
    assert {f"adaptive-{base}" for base in ADAPTIVE_BASES} <= set(list_methods())
    for base in ADAPTIVE_BASES:
        method = create_method(config(f"adaptive-{base}"))
        assert isinstance(method, Adaptive) and method.base.name == base
        assert method.name == f"adaptive-{base}" and method.kappa == 0.3


def test_adaptive_ibp_is_acert_to_the_bit():
    """Same loss, radii, metrics, gradients and radius memory over warm-up and later steps, with
    optimiser steps between them (the warm starts of the second epoch included)."""
    regularizer = WarmupRegularizer(0.2, 0.1)
    acert, wrapped = ACERT(kappa=0.3, regularizer=regularizer), Adaptive(IBP(0.3, regularizer))
    models = [small_net(), small_net()]
    optimizers = [torch.optim.Adam(m.parameters(), lr=0.01) for m in models]
    batch = make_batch()
    for at in [step(0.02, warmup=True), step(0.04, warmup=False), step(0.04, warmup=False)]:
        results = []
        for method, model, optimizer in zip((acert, wrapped), models, optimizers, strict=True):
            optimizer.zero_grad()
            terms = method.loss(model, batch, at)
            terms.loss.backward()
            results.append((terms, grads_of(model)))
            optimizer.step()
        (mine, my_grads), (theirs, their_grads) = results
        assert torch.equal(mine.loss, theirs.loss) and torch.equal(mine.radii, theirs.radii)
        assert mine.metrics == theirs.metrics
        assert all(torch.equal(a, b) for a, b in zip(my_grads, their_grads, strict=True))
    torch.testing.assert_close(
        acert.memory.radius, wrapped.memory.radius, rtol=0, atol=0, equal_nan=True
    )
    assert acert.state_dict().keys() == wrapped.state_dict().keys() == {"radius_memory"}


@pytest.mark.parametrize("base", ADAPTIVE_BASES)
def test_with_every_radius_at_the_cap_the_loss_is_the_base_loss(base, monkeypatch):
    """The base's own loss at ε_s for every sample, warm-up regularisers included, to the bit."""

    def at_the_cap(model, batch, at, *args):
        return torch.full(batch.y.shape, at.eps), 1.0

    monkeypatch.setattr(adaptive_module, "adaptive_radii", at_the_cap)
    model, batch, at = small_net(), make_batch(), step()
    losses = []
    bases = (config(base, kappa=0.0), config(f"adaptive-{base}", kappa=0.0))
    for method in map(create_method, bases):
        trained = copy.deepcopy(model)
        torch.manual_seed(0)
        terms = method.loss(trained, batch, at)
        terms.loss.backward()
        losses.append((terms.loss, grads_of(trained)))
    assert torch.equal(losses[0][0], losses[1][0])
    assert all(torch.equal(a, b) for a, b in zip(losses[0][1], losses[1][1], strict=True))


def test_the_radii_are_acerts_whatever_the_base():
    model, batch, at = small_net(), make_batch(), step(0.04, warmup=False)
    radii = ACERT(memory=None).loss(copy.deepcopy(model), batch, at).radii
    for base in ("taps", "mtl-ibp"):
        method = create_method(config(f"adaptive-{base}", radius_warm_start=False))
        assert torch.equal(method.loss(copy.deepcopy(model), batch, at).radii, radii)
    assert 0 < radii.max() <= 0.04 and radii.min() < 0.04  # per-sample, below the cap


@pytest.mark.parametrize("base", ["sabr", "staps"])
def test_a_small_box_base_trains_where_its_small_box_is_certified(base):
    """SABR and STAPS bound a box of half-width λ·ε_i: the search certifies that box centred at
    the clean point, ε_i = r/λ for r the IBP radius capped at λ·ε_s. At the ball's own IBP
    radius the small box is certified already and the loss has nothing left to train
    (adaptive-staps fell to an IBP ACR of 5% of ε_max that way, docs/RESULTS.md)."""
    model, batch, at = small_net(), make_batch(), step(0.04, warmup=False)
    lam = KNOBS["sabr_lambda"]
    ball = ACERT(memory=None).loss(copy.deepcopy(model), batch, at).radii
    small = dataclasses.replace(at, eps=lam * at.eps)
    searched = ACERT(memory=None).loss(copy.deepcopy(model), batch, small).radii
    method = create_method(config(f"adaptive-{base}", radius_warm_start=False))
    assert method.searched_fraction == lam
    radii = method.loss(copy.deepcopy(model), batch, at).radii
    assert torch.equal(radii, (searched / lam).clamp(max=at.eps))
    assert radii.max() <= at.eps and (radii > ball).any() and (radii >= ball).all()


def test_the_crown_ibp_search_certifies_the_radii_with_crown_ibp():
    model, batch, at = small_net(), make_batch(), step(0.04, warmup=False)
    method = create_method(config("adaptive-crown-ibp", radius_warm_start=False))
    assert method.bound == "crown-ibp"  # its default; the other bases search with IBP
    assert create_method(config("adaptive-sabr")).bound == "ibp"
    assert create_method(config("adaptive-crown-ibp", adaptive_bound="ibp")).bound == "ibp"
    assert create_method(config("adaptive-taps", adaptive_bound="crown-ibp")).bound == "crown-ibp"
    radii = method.loss(copy.deepcopy(model), batch, at).radii
    trained = copy.deepcopy(model)
    logits, stats = clean_forward(trained, batch.x)
    known = KnownBatch(logits=logits.detach(), stats=stats)
    expected = radius_search(
        trained, batch.x, batch.y, 0.04, "crown-ibp", method.search, known=known
    )
    assert torch.equal(radii, expected.radius)
    with pytest.raises(ConfigError, match="adaptive_bound"):
        resolve(tiny_run(method="adaptive-sabr", adaptive_bound="crown"))


def test_kappa_is_the_clean_weight_where_the_base_has_none():
    model, batch, at = small_net(), make_batch(), step(0.04, warmup=False)
    clean = F.cross_entropy(copy.deepcopy(model)(batch.x), batch.y)
    terms = create_method(config("adaptive-sabr", kappa=1.0)).loss(copy.deepcopy(model), batch, at)
    assert terms.loss.item() == pytest.approx(clean.item(), rel=1e-6)
    half = create_method(config("adaptive-sabr", kappa=0.5, radius_warm_start=False))
    none = create_method(config("adaptive-sabr", kappa=0.0, radius_warm_start=False))
    torch.manual_seed(0)
    mixed = half.loss(copy.deepcopy(model), batch, at).loss.item()
    torch.manual_seed(0)
    robust = none.loss(copy.deepcopy(model), batch, at).loss.item()
    assert mixed == pytest.approx(0.5 * robust + 0.5 * clean.item(), rel=1e-5)


@pytest.mark.parametrize("name", ["adaptive-pgd", "adaptive-standard", "adaptive-ibp"])
def test_an_adaptive_method_without_a_certified_loss_is_one_line(name):
    for attempt in (lambda: resolve(tiny_run(method=name)), lambda: create_method(config(name))):
        with pytest.raises(ConfigError) as error:
            attempt()
        message = str(error.value)
        assert "\n" not in message and "acert, adaptive-crown-ibp" in message
        assert "adaptive-staps" in message


def test_the_radius_memory_round_trips_through_the_state():
    method = create_method(config("adaptive-mtl-ibp"))
    method.loss(small_net(), make_batch(), step(0.04, warmup=False))
    fresh = create_method(config("adaptive-mtl-ibp"))
    fresh.load_state_dict(copy.deepcopy(method.state_dict()))
    idx = torch.arange(24)
    torch.testing.assert_close(fresh.memory.guess(idx), method.memory.guess(idx), equal_nan=True)
    assert not torch.isnan(fresh.memory.radius).all()
    assert isinstance(fresh.memory, RadiusMemory)


# --- runs ---------------------------------------------------------------------------------------


def tiny(method: str) -> TrainConfig:
    return method_run(method, cert_eps=[0.02], taps_head=2)


class InterruptError(Exception):
    pass


@pytest.mark.train
@pytest.mark.parametrize("method", ["adaptive-crown-ibp", "adaptive-staps"])
def test_a_run_trains_resumes_certifies_and_pgd_breaks_no_certificate(method, tmp_path):
    straight = run(tiny(method), out=tmp_path / "straight", progress=False, log=lambda _: None)

    def stop_after_second_epoch(line: str) -> None:
        if line.startswith("epoch 2/3"):
            raise InterruptError

    with pytest.raises(InterruptError):
        run(tiny(method), out=tmp_path / "resumed", progress=False, log=stop_after_second_epoch)
    saved = RunDir(tmp_path / "resumed").load_checkpoint("last")["method"]
    assert not torch.isnan(saved["radius_memory"]["radius"]).all()
    resumed = run(
        tiny(method), out=tmp_path / "resumed", resume=True, progress=False, log=lambda _: None
    )
    assert [row["loss"] for row in resumed.history] == pytest.approx(
        [row["loss"] for row in straight.history], rel=1e-5
    )
    assert straight.test.clean_accuracy > 0.3  # ten classes: it learned
    assert 0 < straight.history[-1]["radius"] <= 0.1
    assert resumed.test.acr == pytest.approx(straight.test.acr, rel=1e-5)

    # the certificates of the trained model: no PGD point inside a certified radius flips it
    radii = certify_run(tmp_path / "resumed", data=DataSelection(limit=40)).radii
    images = stratified_subset(load_imageset("mnist5k", "test"), 40, seed=0)  # the run's seed
    x, y = images.floats(), images.labels
    certified = radii > 0
    assert certified.any()
    adversarial = pgd_attack(
        resumed.model, x[certified], y[certified], radii[certified], steps=50, restarts=2
    )
    with torch.no_grad():
        assert (resumed.model(adversarial).argmax(1) == y[certified]).all()


@pytest.mark.train
def test_every_adaptive_method_on_two_processes_is_one_process():
    done = torchrun("-m", "tests.methods.test_adaptive", "two-processes")
    assert done.stdout.count("adaptive on two processes ok") == 2


def _two_processes_worker() -> None:
    """From the same weights and radius memory, each adaptive method's loss on two processes
    holding 12 and 12 of a batch of 24 (weighted, gradients averaged as training does) is one
    process's: the same radii, metrics and gradients to rounding, and each process remembers
    the radii of its own samples, as ACERT's memory does."""
    import torch.distributed as dist

    from acert.foundation.process_group import World, shard
    from acert.workflows.train.ddp import distributed_loss

    torch.set_num_threads(1)
    model, batch, at = small_net(), make_batch(), step(0.04, warmup=False)
    names = ["acert", *(f"adaptive-{base}" for base in ADAPTIVE_BASES)]
    cfg = dataclasses.replace(config("acert"), pgd_restarts=1)
    reference = {}
    for name in names:  # before the group exists: one process
        method, one = create_method(dataclasses.replace(cfg, method=name)), copy.deepcopy(model)
        torch.manual_seed(0)
        terms = method.loss(one, batch, at)
        terms.loss.backward()
        reference[name] = terms, grads_of(one)
    dist.init_process_group("gloo")
    world = World(dist.get_rank(), 2)
    rows, weight = shard(24, world)
    mine = type(batch)(batch.x[rows], batch.y[rows], batch.idx[rows])
    for name in names:
        expected, grads = reference[name]
        method, two = create_method(dataclasses.replace(cfg, method=name)), copy.deepcopy(model)
        loss = distributed_loss(two, method, world)
        torch.manual_seed(0)
        terms = loss(mine, at)
        (weight * terms.loss).backward()
        # to the training search's tolerance (xtol 1e-6 + rtol 1e-4 · r): its brackets move
        # with the rounding of the global batch-norm statistics (observed 6e-7)
        # (a small-box base trains at r/λ: compared as the search's r, λ·ε_i)
        close = {"rtol": 1e-4, "atol": 2e-6}
        fraction = getattr(method, "searched_fraction", 1.0)
        searched = expected.radii[rows] * fraction
        assert torch.allclose(terms.radii * fraction, searched, **close), name
        remembered = method.memory.radius[batch.idx[rows]]  # the radii the search found
        assert torch.allclose(remembered, searched, **close), name
        deterministic = name in ("acert", "adaptive-crown-ibp")  # no random PGD starts
        if deterministic:
            scale = max(grad.abs().max().item() for grad in grads)
            for parameter, grad in zip(two.parameters(), grads, strict=True):
                assert torch.allclose(parameter.grad, grad, rtol=0, atol=1e-4 * scale), name
        else:
            assert all(torch.isfinite(p.grad).all() for p in two.parameters()), name
        del loss
    dist.destroy_process_group()
    print("adaptive on two processes ok", flush=True)


if __name__ == "__main__":
    {"two-processes": _two_processes_worker}[sys.argv[1]]()
