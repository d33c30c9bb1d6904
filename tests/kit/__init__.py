"""The test kit: what the tests share, imported as ``tests.kit.*`` (``tests`` is a package).

- :func:`acert.config.tiny_run` is the one factory of a tiny training run (``.as_flags()`` gives
  its command line); :data:`SHORT_RUN` is its two-epoch preset of the command and sweep tests.
- ``nets``: tiny networks and an independent reference forward; ``exact``/``exact_milp``: the
  exact MILP verifier; ``radius``: the radius-search helpers; ``data``: writers of tiny dataset
  files; ``processes``: ``torchrun`` on two CPU processes.
"""

from __future__ import annotations

from typing import Any

from acert.config import TINY_RUN, TrainConfig, tiny_run

__all__ = ["SHORT_RUN", "TINY_RUN", "InterruptError", "quiet", "short_flags", "tiny_run"]

SHORT_RUN: dict[str, Any] = {
    **TINY_RUN,
    "train_limit": 200,
    "val_size": 40,
    "epochs": 2,
    "stn_epochs": TrainConfig.stn_epochs,
    "eval_limit": 60,
    "eval_pgd_steps": 1,
    "cert_eps": [0.1, 0.2],
    "lr": None,
}
"""Two epochs on 200 digits with the default schedule: the runs of the command-line, sweep
and logger tests."""


def quiet(_line: str) -> None:
    """A ``log`` callback that prints nothing."""


class InterruptError(Exception):
    """Raised by a test's log callback to stop a run where a kill would."""


def short_flags(**overrides: Any) -> list[str]:
    """:data:`SHORT_RUN` with ``overrides`` as the flags of ``acert train`` / ``acert sweep``."""
    return [*tiny_run(SHORT_RUN, **overrides).as_flags(), "--quiet"]
