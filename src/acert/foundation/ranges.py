"""Allowed values: one rule object per setting, that both checks a value and says itself in words.

A rule is made once, where the setting it governs is defined, and every place that takes the
setting uses that object: a config key's field (:mod:`acert.config`, whose ``--help``, validation
and docs/CONFIG.md all read the field) and, for an object that API users build directly, its
own ``__post_init__`` (:class:`acert.methods.TrainingAttack`, :class:`acert.radius.SearchSettings`).

``rule.check(value, name)`` raises a one-line :class:`~acert.foundation.errors.ConfigError` that
names the setting, the allowed values and what was given; ``rule.describe()`` is the same rule for
the documentation (``in [0, 1]``, ``>= 2``, ``one of csv, tensorboard``).
"""

from __future__ import annotations

import importlib
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from acert.foundation.errors import AcertError, ConfigError

__all__ = ["OneOf", "Parsed", "Range", "Rule", "above", "at_least", "between"]


class Rule(Protocol):
    """What a setting may hold."""

    def check(self, value: Any, name: str) -> None:
        """A one-line ConfigError naming ``name`` unless ``value`` is allowed."""
        ...

    def describe(self) -> str:
        """The rule in words, for ``--help`` and the docs."""
        ...


def _number(value: float) -> str:
    return f"{value:g}"


@dataclass(frozen=True)
class Range:
    """A number in an interval (either end may be open or absent), optionally whole or null.

    Attributes:
        low, high: the ends (None: unbounded).
        low_open, high_open: whether an end is excluded.
        whole: only whole numbers (ints, not bools).
        null: what null (None) means where it is allowed ("PyTorch's default"); None: not allowed.
        unit: appended to the interval ("pixel units").
        why: a reason, shown in the error after the rule ("0 skips the attack").
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    whole: bool = False
    null: str | None = None
    unit: str = ""
    why: str = ""

    def _interval(self) -> str:
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            text = f"in {left}{_number(self.low)}, {_number(self.high)}{right}"
        elif self.low is not None:
            text = f"{'>' if self.low_open else '>='} {_number(self.low)}"
        elif self.high is not None:
            text = f"{'<' if self.high_open else '<='} {_number(self.high)}"
        else:
            text = "any number"
        return f"{text} {self.unit}" if self.unit else text

    def describe(self) -> str:
        text = self._interval()
        if self.why:
            text += f" ({self.why})"
        return f"{text}, or null ({self.null})" if self.null is not None else text

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is allowed."""
        if value is None:
            return self.null is not None
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return False
        if self.whole and not isinstance(value, numbers.Integral):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def check(self, value: Any, name: str) -> None:
        if self.contains(value):
            return
        wrong_kind = value is not None and (
            isinstance(value, bool)
            or not isinstance(value, numbers.Real)
            or (self.whole and not isinstance(value, numbers.Integral))
        )
        if wrong_kind:
            text = f"{name} must be {'a whole number' if self.whole else 'a number'}"
            text += f" {self._interval()}"
        else:
            verb = "lie" if self.low is not None and self.high is not None else "be"
            text = f"{name} must {verb} {self._interval()}"
        if self.null is not None:
            text += f" or null ({self.null})"
        if self.why:
            text += f" ({self.why})"
        raise ConfigError(f"{text}, got {value!r}")


def between(
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
    unit: str = "",
    why: str = "",
) -> Range:
    """Numbers in [low, high] (ends excluded where ``*_open``)."""
    return Range(low, high, low_open, high_open, unit=unit, why=why)


def at_least(low: float, *, whole: bool = False, null: str | None = None, why: str = "") -> Range:
    """Numbers >= ``low``."""
    return Range(low, whole=whole, null=null, why=why)


def above(low: float, *, null: str | None = None, why: str = "") -> Range:
    """Numbers > ``low``."""
    return Range(low, low_open=True, null=null, why=why)


@dataclass(frozen=True)
class OneOf:
    """One of a list of names; ``names`` may be a function, for registries read when checked.

    Attributes:
        names: the allowed names, or a function returning them.
        summary: the rule in words instead of the list ("a model of `acert list`"), for lists
            that grow; errors always list the names.
    """

    names: Sequence[str] | Callable[[], Sequence[str]]
    summary: str | None = None

    def choices(self) -> list[str]:
        return list(self.names() if callable(self.names) else self.names)

    def check(self, value: Any, name: str) -> None:
        choices = self.choices()
        if not isinstance(value, str) or value not in choices:
            raise ConfigError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")

    def describe(self) -> str:
        return self.summary or f"one of {', '.join(self.choices())}"


@dataclass(frozen=True)
class Parsed:
    """A value that a parsing function accepts (it raises its own one-line error otherwise).

    Attributes:
        parse: called with the value; raises an AcertError naming the problem and the fix.
        summary: the rule in words.
    """

    parse: Callable[[Any], object]
    summary: str

    def check(self, value: Any, name: str) -> None:
        self.parse(value)

    def describe(self) -> str:
        return self.summary


def settings_object(value: Any, kind: type, name: str, public: str, fix: str) -> Any:
    """``value`` if it is a ``kind`` (a settings object of the API), else a one-line
    :class:`AcertError` naming the argument, the class as the API exports it (``public``) and
    the ``fix``."""
    if not isinstance(value, kind):
        raise AcertError(f"{name} must be an {public}, got {type(value).__name__}; {fix}")
    return value


class Deferred:
    """A rule that lives in a module imported only when the rule is used: the config names
    the rules of the training and evaluation code without importing that code
    (``acert.records.plots`` reads run folders through the config and must stay light). Behaves as
    the rule itself."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def resolve(self) -> Rule:
        """The rule itself (its module imported now)."""
        return getattr(importlib.import_module(self.module), self.name)

    def check(self, value: Any, name: str) -> None:
        self.resolve().check(value, name)

    def describe(self) -> str:
        return self.resolve().describe()

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self.resolve(), attribute)


# Rules that the config and the objects taking the same setting share (one check per setting).
ATTACK_STEPS = at_least(0, whole=True)
"""Steps of a training attack (config key ``pgd_steps``)."""

ATTACK_STEP_SIZE = above(0, null="2.5·ε/steps")
"""Step length of a training attack in pixel units (config key ``pgd_step_size``)."""

ATTACK_RESTARTS = at_least(1, whole=True)
"""Random starts of a training attack (config key ``pgd_restarts``)."""

PGD_STEPS = at_least(0, whole=True, why="0 skips the attack")
"""PGD steps of an evaluation's attack (config key ``eval_pgd_steps``)."""
