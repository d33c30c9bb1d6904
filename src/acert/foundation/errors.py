"""User-facing errors.

Every problem a user can cause (a wrong path, an unknown name, a corrupt file, a value out of
range) is raised as an :class:`AcertError` whose message is one line naming the problem and the
fix. The command line prints that line and exits with status 2; library users can catch the class.
"""

from __future__ import annotations


class AcertError(ValueError):
    """A problem with the user's input, reported as one line that names the fix."""


class DatasetError(AcertError):
    """A dataset is unknown, missing or malformed."""


class ConfigError(AcertError):
    """A configuration key, value or combination is invalid."""


class CheckpointError(AcertError):
    """A checkpoint or run folder is missing, corrupt or not an acert checkpoint."""


class UnsupportedModelError(AcertError):
    """A model contains a layer the bound propagation has no rule for."""
