"""Run configuration: one flat dataclass, dataset presets, YAML files and command-line overrides.

Precedence, lowest first: the field defaults, the dataset's preset (docs/METHOD.md, "Optimisation"),
a YAML file, then ``key=value`` overrides. A field left ``None`` takes the dataset's value when
the config is resolved; the resolved config is what a run folder stores.

Every key is documented once, beside its field (:mod:`acert.config.fields`): its help text and
the rule of its allowed values, which ``--help``, :func:`validate` and docs/CONFIG.md read.
"""

from __future__ import annotations

from acert.config.devices import available_device, parse_device
from acert.config.docs import flag_help, markdown_table
from acert.config.fields import (
    GIVEN_METHOD,
    GIVEN_MODEL,
    LOGGERS,
    SYSTEM_KEYS,
    Key,
    TrainConfig,
    changed_keys,
    config_key,
    config_keys,
    method_keys,
)
from acert.config.resolve import (
    CROSS_CHECKS,
    PRESETS,
    CrossCheck,
    check_key,
    check_resolved,
    resolve,
    validate,
)
from acert.config.tiny import BENCH_RUN, TINY_RUN, tiny_run
from acert.config.values import config_from_dict, load_yaml, parse_override

__all__ = [
    "BENCH_RUN",
    "CROSS_CHECKS",
    "GIVEN_METHOD",
    "GIVEN_MODEL",
    "LOGGERS",
    "PRESETS",
    "SYSTEM_KEYS",
    "TINY_RUN",
    "CrossCheck",
    "Key",
    "TrainConfig",
    "available_device",
    "changed_keys",
    "check_key",
    "check_resolved",
    "config_from_dict",
    "config_key",
    "config_keys",
    "flag_help",
    "load_yaml",
    "markdown_table",
    "method_keys",
    "parse_device",
    "parse_override",
    "resolve",
    "tiny_run",
    "validate",
]
