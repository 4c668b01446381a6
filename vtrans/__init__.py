"""vtrans: how sure is a transformer of its answer?

The public API, imported on first use (so that ``import vtrans`` and the command line's
``--help`` stay light):

* :class:`Scorer`: completions and uncertainty scores for prompts, from a trained checkpoint
  or a latent saved with ``save_pretrained``;
* :class:`Backbone`: a frozen causal LM the latent is built around, loaded by name or wrapped
  as it is in memory (``Backbone.from_model(model, tokenizer)``);
* :class:`LatentModel`: the latent and its backbone, to score with; ``save_pretrained`` and
  ``from_pretrained`` write and read it as safetensors beside a JSON config;
* :class:`EstimatorConfig`: how the estimators run; :class:`EvalConfig`, the settings of a
  comparative run (``vtrans.evaluation.evaluate.evaluate``); :class:`CrossvalConfig`, those of the
  cross-fitted one (``vtrans.evaluation.crossval.crossval``).
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vtrans")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

_EXPORTS = {
    "Scorer": "vtrans.scoring.scorer",
    "Backbone": "vtrans.backbone.loading",
    "LatentModel": "vtrans.latent.model",
    "EstimatorConfig": "vtrans.config",
    "EvalConfig": "vtrans.config",
    "CrossvalConfig": "vtrans.config",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vtrans' has no attribute {name!r}")
