"""Where each module of the flat layout went: the one map from an old module path to its new one.

The package was flat until it was laid out by layer (``vtrans.backbone``, ``vtrans.latent``,
``vtrans.estimators``, ``vtrans.evaluation``, ``vtrans.scoring``, ``vtrans.cli``, ``vtrans.data``).
Training configs, the ``config.yaml`` that a training run writes beside its logs, and code of
one's own name classes by their old paths (``vtrans.loading.Backbone``,
``vtrans.checkpoint_io.AtomicCheckpointIO``, ``vtrans.module.LatentLM``, ...). :class:`Finder`,
which ``import vtrans`` puts on ``sys.meta_path``, answers an import of an old path with the
module that holds its content now: ``import vtrans.loading`` gives ``vtrans.backbone.loading``
itself (one module object under both names), so every class keeps its identity. A module that
was split went to the module that holds its main names; the names that moved to a sibling are
found there.

Old paths that are packages now (``vtrans.latent``, ``vtrans.data``, ``vtrans.cli``) are not
here: the package itself keeps the old module's names.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

MOVED: dict[str, str] = {
    "vtrans.backbones": "vtrans.backbone.architectures",  # attention masks and full_cache: vtrans.backbone.attention
    "vtrans.loading": "vtrans.backbone.loading",  # the sources: vtrans.backbone.files, embedded, random_weights
    "vtrans.tokens": "vtrans.backbone.tokens",
    "vtrans.generate": "vtrans.backbone.generate",
    "vtrans.frozen": "vtrans.backbone.frozen",
    "vtrans.elbo": "vtrans.latent.elbo",
    "vtrans.model": "vtrans.latent.model",  # saving and rebuilding: vtrans.latent.saved
    "vtrans.module": "vtrans.latent.module",  # the batch loss: vtrans.latent.elbo; what it logs: vtrans.latent.stats
    "vtrans.laplace": "vtrans.latent.laplace",
    "vtrans.training": "vtrans.latent.training",
    "vtrans.datamodule": "vtrans.latent.datamodule",
    "vtrans.callbacks": "vtrans.latent.callbacks",
    "vtrans.checkpoint": "vtrans.latent.checkpoint",
    "vtrans.checkpoint_io": "vtrans.latent.checkpoint_io",
    "vtrans.runner": "vtrans.estimators.runner",  # the plan of a run: vtrans.estimators.plan
    "vtrans.distributed": "vtrans.estimators.distributed",
    "vtrans.evaluate": "vtrans.evaluation.evaluate",  # vtrans.evaluation.items, scored, fitted
    "vtrans.crossval": "vtrans.evaluation.crossval",  # vtrans.evaluation.crossval_results, fitted
    "vtrans.folds": "vtrans.evaluation.folds",
    "vtrans.units": "vtrans.evaluation.units",
    "vtrans.metrics": "vtrans.evaluation.metrics",  # a package: ranking, counts, bootstrap
    "vtrans.report": "vtrans.evaluation.report",  # a package: results, tables, plots, prose
    "vtrans.scorer": "vtrans.scoring.scorer",  # vtrans.scoring.inputs, request, prompts, records
}
"""Old module path -> the module that holds its content now."""


def flat_spelling(text: str) -> str:
    """``text`` with every class path of a moved module spelt as the flat layout spelt it
    (``vtrans.backbone.loading.Backbone`` -> ``vtrans.loading.Backbone``): what a record of a
    config's content is taken over, so that the configs' move to the new paths leaves the runs
    recorded before it resumable (``vtrans.evaluation.crossval``'s manifest)."""
    for old, new in MOVED.items():
        text = text.replace(f"{new}.", f"{old}.")
    return text


class _Alias(importlib.abc.Loader):
    """Loads an old path as the module it moved to: that module object, not a copy."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.own_spec: importlib.machinery.ModuleSpec | None = None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(self.target)
        self.own_spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # the import system has just given the module the old path's spec: it keeps its own
        module.__spec__ = self.own_spec


class Finder(importlib.abc.MetaPathFinder):
    """Finds the old module paths of :data:`MOVED` (and nothing else)."""

    def find_spec(self, fullname: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, _Alias(MOVED[fullname]))


def install() -> None:
    """Put the :class:`Finder` first on ``sys.meta_path`` (once): no real module has an old path,
    and an old copy of the package installed elsewhere must not answer for one."""
    if not any(isinstance(finder, Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, Finder())
