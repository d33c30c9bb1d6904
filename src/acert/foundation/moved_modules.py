"""Old import paths of the modules that moved into subpackages (0.2, docs/ARCHITECTURE.md,
"Layout"): ``import acert.train`` and ``from acert.evaluate import evaluate`` keep working for
one release, each with a DeprecationWarning naming the new path, and give the very module of the
new path (one module object, so patching either name patches both).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import ModuleType

__all__ = ["MOVED_MODULES", "MovedModuleFinder", "install"]

MOVED_MODULES: dict[str, str] = {
    "acert._certify_cli": "acert.cli.certify",
    "acert.train": "acert.workflows.train.run",
    "acert.train_loop": "acert.workflows.train.loop",
    "acert._train_state": "acert.workflows.train.state",
    "acert._train_ddp": "acert.workflows.train.ddp",
    "acert.certify_runs": "acert.workflows.certify.runs",
    "acert.sweep": "acert.workflows.sweep.run",
    "acert._sweep_jobs": "acert.workflows.sweep.jobs",
    "acert._sweep_point": "acert.workflows.sweep.point",
    "acert.export": "acert.workflows.export.run",
    "acert.export_fold": "acert.workflows.export.fold",
    "acert.export_onnx": "acert.workflows.export.onnx_graph",
    "acert.export_abcrown": "acert.workflows.export.abcrown",
    "acert.export_settings": "acert.workflows.export.settings",
    "acert.bench": "acert.workflows.bench.run",
    "acert._bench_timing": "acert.workflows.bench.timing",
    "acert._bench_table": "acert.workflows.bench.table",
    "acert.runs": "acert.records.runs",
    "acert.loggers": "acert.records.loggers",
    "acert.study": "acert.records.study",
    "acert.plots": "acert.records.plots",
    "acert.seeds": "acert.records.seeds",
    "acert._plot_labels": "acert.records.plot_labels",
    "acert.evaluate": "acert.evaluation.evaluate",
    "acert.evaluate_sharded": "acert.evaluation.sharded",
    "acert.attacks": "acert.radius.attacks",
    "acert.errors": "acert.foundation.errors",
    "acert.ranges": "acert.foundation.ranges",
    "acert.process_group": "acert.foundation.process_group",
    "acert._threads": "acert.foundation.threads",
    "acert.schedules": "acert.foundation.schedules",
    "acert.bounds.steps": "acert.bounds.kind_rules",
    "acert.bounds.layers": "acert.bounds.clean_pass",
}
"""Old dotted name -> the module's dotted name now."""


def _caller_stacklevel() -> int:
    """The stack level of the first frame outside the import machinery and this module, so that
    the warning names the line that imported the old path."""
    frame, level = sys._getframe(1), 1
    while frame is not None and (
        frame.f_code.co_filename.startswith("<frozen importlib")
        or frame.f_code.co_filename == __file__
        or "importlib" in frame.f_code.co_filename
    ):
        frame, level = frame.f_back, level + 1
    return level


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old dotted name of :data:`MOVED_MODULES` to the module at its new path."""

    def find_spec(
        self, fullname: str, path: object = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new_name = MOVED_MODULES[spec.name]
        warnings.warn(
            f"{spec.name} moved to {new_name}; import it from there "
            "(the old path goes in the next release)",
            DeprecationWarning,
            stacklevel=_caller_stacklevel(),
        )
        return importlib.import_module(new_name)

    def exec_module(self, module: ModuleType) -> None:
        """The module at the new path has run already."""


def install() -> None:
    """Put the finder on ``sys.meta_path`` once."""
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
