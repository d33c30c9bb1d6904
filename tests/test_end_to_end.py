"""End to end on real digits: ACERT training certifies far more than standard training.

Both runs use the same model, data, budget and seed; only the loss differs.
"""

import pytest
import torch

from acert.config import TrainConfig
from acert.data import load_imageset, stratified_subset
from acert.radius.attacks import pgd_attack
from acert.workflows.train.run import run
from tests.kit import tiny_run


def budget(method: str) -> TrainConfig:
    return tiny_run(
        method=method,
        model="cnn7-tiny",
        train_limit=1200,
        val_size=100,
        epochs=8,
        reg_epochs=4,
        stn_epochs=TrainConfig.stn_epochs,
        batch_size=32,
        eval_limit=400,
        eps_max=0.1,
        cert_eps=[0.05, 0.1],
        eval_pgd_steps=5,
        lr=None,
        seed=1,
    )


@pytest.mark.train
@pytest.mark.slow
def test_acert_raises_acr_well_above_standard_training(tmp_path):
    acert = run(budget("acert"), out=tmp_path / "acert", progress=False, log=lambda _: None)
    standard = run(
        budget("standard"), out=tmp_path / "standard", progress=False, log=lambda _: None
    )
    assert standard.test.clean_accuracy > 0.8
    assert acert.test.clean_accuracy > 0.7
    assert acert.test.acr > 0.04  # 40% of ε_max = 0.1
    assert acert.test.acr > 10 * standard.test.acr
    assert acert.test.certified_accuracy[0.05] > standard.test.certified_accuracy[0.05] + 0.3

    # no certificate of the trained model falls to a strong attack inside its radius
    test = stratified_subset(load_imageset("mnist5k", "test"), 400, seed=1)  # as eval_limit does
    x, y = test.floats(), test.labels
    radii = torch.load(tmp_path / "acert" / "radii.pt")
    certified = radii > 0
    adversarial = pgd_attack(
        acert.model, x[certified], y[certified], radii[certified], steps=50, restarts=2
    )
    with torch.no_grad():
        assert (acert.model(adversarial).argmax(1) == y[certified]).all()
