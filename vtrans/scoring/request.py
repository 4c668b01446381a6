"""The request: the estimators and the template a scorer is asked for, checked before anything loads.

**Templates.** A checkpoint's latent was trained on prompts made by a template from an idiom's
beginning (``"Complete the idiom: {prefix}"``): ``template="ckpt"`` applies that template to
every input (the built-in one when the checkpoint records none), so that an input is an idiom's
beginning, as in training; ``None`` (or ``"none"``) scores the inputs verbatim.

The request is checked against what the checkpoint records (``vtrans.latent.checkpoint.read``)
before the base model loads; :func:`load_latent` then loads the latent where it is scored.
"""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path

from vtrans import log
from vtrans.config import EstimatorConfig
from vtrans.data import validate_template
from vtrans.errors import ConfigError
from vtrans.estimators import distributed
from vtrans.estimators.registry import NAMES, SCORABLE, SCORE_DEFAULTS, why_not

SETTINGS = frozenset(f.name for f in fields(EstimatorConfig))
"""The settings a scorer takes by name: the fields of :class:`vtrans.config.EstimatorConfig`."""


def prior_of(module) -> str | None:
    """The prior of a latent (``standard`` or ``conditional``), or None without one."""
    return None if module is None else module.latent.prior


ANSWER_DEFAULTS = (
    "sequence_nll",
    "perplexity",
    "max_token_nll",
    "sequence_doubt",
    "mean_token_entropy",
    "adapter_answer_nll",
    "latent_answer_nll",
    "latent_answer_gap",
)
"""What answers of several words add to the defaults: the whole answer's scores (and with them its
per-token ones); ``rauq`` is left to be asked for, as it switches the forward to eager attention."""


def default_estimators(prior: str | None, aggregate: str = "first", answer_words: int = 1) -> list[str]:
    """Every single-pass and latent estimator that applies to a latent with this prior (no MC
    dropout, no sampling, no fitted one); with answers of several words, the whole answer's too."""
    names = [*SCORE_DEFAULTS, *(ANSWER_DEFAULTS if answer_words > 1 else ())]
    return [n for n in names if why_not(n, prior, aggregate) is None]


def check_estimators(
    names: list[str] | None, prior: str | None, aggregate: str = "first", answer_words: int = 1
) -> list[str]:
    """The estimators to score with (the defaults for ``None``), each one ``score`` can run with a
    latent of this prior; checked before any model loads.

    Raises:
        ConfigError: an unknown name (the message lists those ``score`` can run), a fitted one
            (``registry.fitted``), one the latent or the aggregate does not allow, or none at all.
    """
    if names is None:
        names = default_estimators(prior, aggregate, answer_words)
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        raise ConfigError(f"unknown estimator(s) {', '.join(unknown)}: score can run {', '.join(SCORABLE)}")
    fitted = [n for n in names if n not in SCORABLE]
    if fitted:
        raise ConfigError(
            f"{', '.join(fitted)} is fitted on labelled items: use vtrans evaluate; score can run {', '.join(SCORABLE)}"
        )
    for name in names:
        why = why_not(name, prior, aggregate)
        if why is not None:
            raise ConfigError(f"{name} {why}")
    if not names:
        raise ConfigError("no estimators asked for: name at least one")
    return list(dict.fromkeys(names))


def check_request(
    ckpt: dict, estimators: list[str] | None, template: str | None, config: EstimatorConfig
) -> tuple[list[str], str | None]:
    """The estimators and the template a request to score with a checkpoint comes to, from the
    checkpoint's contents (``vtrans.latent.checkpoint.read``) alone: nothing loads.

    Raises:
        ConfigError, DataError: see :func:`check_estimators` and :func:`resolve_template`.
    """
    from vtrans.latent import checkpoint

    asked = None if estimators is None else list(estimators)
    names = check_estimators(asked, checkpoint.prior_in(ckpt), config.aggregate, config.answer_words)
    return names, resolve_template(template, checkpoint.template_in(ckpt))


def resolve_template(template: str | None, recorded: str | None) -> str | None:
    """The template to apply: ``ckpt`` gives the checkpoint's (``recorded``; the built-in one when
    it records none), ``None`` or ``none`` none at all (prompts verbatim), anything else itself.

    Raises:
        DataError: a template without exactly one ``{prefix}`` field.
    """
    from vtrans.data import DEFAULT_TEMPLATE

    if template is None or template == "none":
        return None
    if template == "ckpt":
        template = recorded or DEFAULT_TEMPLATE
    validate_template(template)
    return template


def estimator_config(config: EstimatorConfig | None, settings: dict) -> EstimatorConfig:
    """``config`` (default: the defaults) with the fields ``settings`` names put in.

    Raises:
        TypeError: a setting that is not a field of :class:`vtrans.config.EstimatorConfig`.
    """
    unknown = sorted(set(settings) - SETTINGS)
    if unknown:
        raise TypeError(f"Scorer got unknown setting(s) {', '.join(unknown)}")
    return replace(config or EstimatorConfig(), **settings)


def load_request(
    path: str | Path, device: str, estimators: list[str] | None, template: str | None, backbone, options: dict
) -> tuple:
    """What ``Scorer.from_checkpoint`` asks for, checked against the checkpoint before its latent
    loads: ``(module, estimators, template, config)``. The estimator settings among ``options``
    (and its ``config``) are taken out of it; the rest are the other arguments of ``Scorer``."""
    from vtrans.latent import checkpoint

    ckpt = checkpoint.read(path)
    settings = {name: options.pop(name) for name in list(options) if name in SETTINGS}
    config = replace(options.pop("config", None) or EstimatorConfig(), **settings)
    estimators, template = check_request(ckpt, estimators, template, config)
    return load_latent(path, ckpt, device, backbone), estimators, template, config


def load_latent(path: str | Path, ckpt: dict, device: str = "auto", backbone=None):
    """The latent of the checkpoint (or ``save_pretrained`` folder) at ``path``, whose contents
    ``ckpt`` are, loaded where it is scored: ``auto`` with a ``backbone`` given, where that model is;
    else ``device`` resolved (``auto``: CUDA when available), this rank's own GPU under a process group."""
    from vtrans.backbone.loading import resolve_device
    from vtrans.latent import checkpoint

    if backbone is not None and device == "auto":
        device = backbone.device  # a model in memory is scored where it is
    else:
        device = distributed.rank_device(resolve_device(device), distributed.current())
    with log.phase("loaded {path} and its base model {model}") as info:
        module = checkpoint.load(path, device=device, backbone=backbone, ckpt=ckpt)
        info.update(path=path, model=module.backbone.label)
    return module
