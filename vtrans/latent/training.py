"""One way to train a latent: the LightningModule, DataModule and Trainer a training YAML describes.

``python train.py fit --config FILE`` (:func:`vtrans.cli.train_main`), ``vtrans crossval`` (a
latent per seed and fold) and ``experiments/sweep.py`` (a latent per variant) all build them
with :class:`TrainingCLI`: LightningCLI over :class:`vtrans.latent.module.LatentLM` and
:class:`vtrans.latent.datamodule.IdiomDataModule`, the YAML's trainer settings as written (accelerator,
devices, precision, callbacks, loggers, ...), and the safeguards always on: checkpoints written
atomically and never with non-finite values (:class:`vtrans.latent.checkpoint_io.AtomicCheckpointIO`),
the random states saved in every checkpoint (:class:`vtrans.latent.callbacks.ResumableRNG`), a stop at
the first non-finite weight or gradient (:class:`vtrans.latent.callbacks.NonFiniteGuard`), and the
model summary that says what trains (:class:`vtrans.latent.callbacks.Summary`, in place of Lightning's).

:func:`build` is the entry for code: a YAML (a path or its content), overrides as dotted keys
the way the command line spells them (``{"trainer.max_epochs": 1}``), and optionally a backbone
already loaded (used instead of loading the one the YAML names again; it must be that one) and
the items to train on (a fold's, in place of the YAML's data spec). :func:`fit` runs the
training and turns a non-finite stop into :class:`vtrans.errors.TrainingStopped`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
import logging
import re
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import yaml
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Checkpoint, ModelSummary, RichModelSummary
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from vtrans.backbone.frozen import FrozenCache
from vtrans.backbone.loading import Backbone
from vtrans.data import IdiomItem
from vtrans.errors import ConfigError, TrainingStopped, UserError
from vtrans.latent.calibrate import Calibrate
from vtrans.latent.callbacks import NonFiniteGuard, ResumableRNG, Summary
from vtrans.latent.datamodule import IdiomDataModule
from vtrans.latent.module import LatentLM

FLAT_LAYOUT = {
    "vtrans.loading.Backbone": "vtrans.backbone.loading.Backbone",
    "vtrans.module.LatentLM": "vtrans.latent.module.LatentLM",
    "vtrans.datamodule.IdiomDataModule": "vtrans.latent.datamodule.IdiomDataModule",
    "vtrans.checkpoint_io.AtomicCheckpointIO": "vtrans.latent.checkpoint_io.AtomicCheckpointIO",
    "vtrans.checkpoint.AtomicCheckpointIO": "vtrans.latent.checkpoint_io.AtomicCheckpointIO",
    "vtrans.callbacks.NonFiniteGuard": "vtrans.latent.callbacks.NonFiniteGuard",
    "vtrans.callbacks.ResumableRNG": "vtrans.latent.callbacks.ResumableRNG",
    "vtrans.callbacks.Summary": "vtrans.latent.callbacks.Summary",
}
"""The class paths that training configs named before the package was laid out by layer, and
each class's path now: a config that names one is refused with the replacement to make."""


def refuse_flat_layout(text: str, where: str) -> None:
    """Refuse a config (its text) that names a class by a path of the flat layout, saying what to write instead.

    Raises:
        ConfigError: naming each old path found and its replacement.
    """
    found = [old for old in FLAT_LAYOUT if re.search(rf"(?<![\w.]){re.escape(old)}(?!\w)", text)]
    if found:
        fixes = "; ".join(f"{old} -> {FLAT_LAYOUT[old]}" for old in found)
        raise ConfigError(f"{where} names classes by paths this version no longer has: replace {fixes}")


def _config_files(args: list[str]) -> Iterator[str]:
    """The files a command line gives with ``--config`` (or ``-c``), in either spelling."""
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            yield args[i + 1]
        elif arg.startswith("--config="):
            yield arg.split("=", 1)[1]


def trainer_defaults(guard: NonFiniteGuard | None = None) -> dict[str, Any]:
    """The Trainer settings every training run gets: the atomic checkpoint writer, the saved
    random states, the non-finite guard (``guard``, where the caller wants to ask it where it
    stopped) and ``p_wrong``'s calibration on the validation split."""
    return {
        "plugins": [{"class_path": "vtrans.latent.checkpoint_io.AtomicCheckpointIO"}],
        "callbacks": [ResumableRNG(), guard or NonFiniteGuard(), Calibrate()],
    }


class TrainingCLI(LightningCLI):
    """LightningCLI of the latent and its data with :func:`trainer_defaults`.

    With ``trainer.enable_checkpointing: false`` the configured checkpoint callbacks are left out
    (Lightning refuses a Trainer with both). A ``backbone`` given is used wherever the config
    names a ``vtrans.backbone.loading.Backbone``, after checking that it is the one named. A Trainer
    setting Lightning cannot use is a :class:`vtrans.errors.ConfigError`.
    """

    def __init__(
        self,
        args: Any = None,
        run: bool = True,
        guard: NonFiniteGuard | None = None,
        backbone: Backbone | None = None,
        save_config: bool = True,
        parser_kwargs: dict | None = None,
    ) -> None:
        self.given_backbone = backbone
        try:
            super().__init__(
                LatentLM,
                IdiomDataModule,
                args=args,
                run=run,
                save_config_callback=SaveConfigCallback if save_config else None,
                save_config_kwargs={"overwrite": True},
                trainer_defaults=trainer_defaults(guard),
                parser_kwargs=parser_kwargs,
            )
        except MisconfigurationException as err:  # a trainer setting Lightning cannot use (devices, max_epochs, ...)
            lines = str(err).strip().splitlines()
            raise ConfigError(f"trainer: {lines[0] if lines else type(err).__name__}") from None

    def parse_arguments(self, parser, args) -> None:
        if isinstance(args, dict):
            refuse_flat_layout(yaml.safe_dump(args), "the training config")
        else:
            for name in _config_files(list(sys.argv[1:] if args is None else args)):
                if Path(name).is_file():
                    refuse_flat_layout(Path(name).read_text(encoding="utf-8"), name)
        super().parse_arguments(parser, args)

    def before_instantiate_classes(self) -> None:
        if self.given_backbone is not None:
            self.parser.add_instantiator(self._given_backbone, Backbone, subclasses=True, prepend=True)

    def _given_backbone(self, class_type: type, *args: Any, **kwargs: Any) -> Backbone:
        defaults = {k: p.default for k, p in inspect.signature(Backbone).parameters.items()}
        wanted = {k: v for k, v in {**defaults, **kwargs}.items() if k in defaults}
        given = {k: v for k, v in self.given_backbone.spec.items() if k != "weights"}  # the weights follow from the name
        if wanted != given:
            raise ConfigError(f"the backbone given ({self.given_backbone.spec}) is not the config's ({wanted})")
        return self.given_backbone

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        settings = config["trainer"]
        if settings.get("enable_checkpointing") is False and settings.get("callbacks"):
            given = settings["callbacks"] if isinstance(settings["callbacks"], list) else [settings["callbacks"]]
            settings["callbacks"] = [c for c in given if not isinstance(c, Checkpoint)]
        trainer = super().instantiate_trainer(**kwargs)
        # Lightning's summary (on unless enable_model_summary is false, or one a config names) gives
        # way to Summary of the same depth, which says what trains
        lightnings = (ModelSummary, RichModelSummary)
        trainer.callbacks = [Summary(cb._max_depth) if type(cb) in lightnings else cb for cb in trainer.callbacks]
        return trainer


class Built(NamedTuple):
    """What :func:`build` returns: ready for ``trainer.fit(module, datamodule=datamodule)`` (or :func:`fit`)."""

    module: LatentLM
    datamodule: IdiomDataModule
    trainer: L.Trainer


def build(
    config: str | Path | dict,
    overrides: dict[str, Any] | None = None,
    items: list[IdiomItem] | None = None,
    backbone: Backbone | None = None,
    frozen: FrozenCache | None = None,
) -> Built:
    """The module, data and Trainer that ``python train.py fit --config CONFIG`` would train with.

    The config's ``seed_everything`` seeds every generator before the module is built, as
    ``train.py`` does. Nothing is written by building (no ``config.yaml`` beside the logs, as
    ``train.py`` leaves): the config's loggers and checkpoint callbacks write when training runs,
    where the config (or ``overrides``) says.

    Args:
        config: a training YAML (``configs/NAME.yaml``), or its content as a dict.
        overrides: settings that replace the config's, by dotted key: ``{"trainer.max_epochs": 2,
            "seed_everything": 1, "trainer.logger": False}``.
        items: train on these idioms (:meth:`IdiomDataModule.from_items`, with the config's
            template, batch size, seed, bucketing and ``answer_words``) instead of the config's data spec; no
            validation split then.
        backbone: the backbone the config names, already loaded (not loaded again).
        frozen: the frozen backbone's per-item states to share with other latents of the same
            backbone and layer, where the latent caches them (``cache_frozen``).

    Raises:
        ConfigError: a setting the parser or Lightning refuses, or a backbone that is not the config's.
    """
    settings = read_yaml(config) if not isinstance(config, dict) else copy.deepcopy(config)
    for key, value in (overrides or {}).items():
        _set(settings, key, value)
    try:
        with warnings.catch_warnings():  # settings given in code, whatever the command line of the program says
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            cli = TrainingCLI(
                settings, run=False, backbone=backbone, save_config=False, parser_kwargs={"exit_on_error": False}
            )
    except argparse.ArgumentError as err:  # the parser's: a key it does not know, a value of the wrong type
        raise ConfigError(f"{_name(config)}: {_parser_error(str(err))}") from None
    module, datamodule = cli.model, cli.datamodule
    if items is not None:
        hp = datamodule.hparams
        datamodule = IdiomDataModule.from_items(
            items,
            template=hp.template,
            batch_size=hp.batch_size,
            seed=hp.seed,
            length_bucketed=hp.length_bucketed,
            answer_words=hp.answer_words,
        )
        datamodule.hparams.num_workers = hp.num_workers
    if frozen is not None and module.hparams.cache_frozen:
        module.frozen_cache = frozen
    return Built(module, datamodule, cli.trainer)


def fit(built: Built) -> None:
    """``trainer.fit``; the module stays on the Trainer's device afterwards (Lightning's teardown
    moves it to the CPU, and with it a backbone other latents share).

    Raises:
        TrainingStopped: a non-finite loss, weight, gradient or checkpoint stopped the training.
    """
    module, datamodule, trainer = built
    guard = next((cb for cb in trainer.callbacks if isinstance(cb, NonFiniteGuard)), NonFiniteGuard())
    with stopping(guard):
        trainer.fit(module, datamodule=datamodule)
    module.to(trainer.strategy.root_device)


@contextlib.contextmanager
def stopping(guard: NonFiniteGuard) -> Iterator[None]:
    """Turn the ways training stops at a non-finite value into :class:`TrainingStopped`: the
    guard's and the module's ``FloatingPointError`` (naming the step), and a distribution's
    validation error deep in Pyro (NaN or inf among its parameters: named by the guard's last step)."""
    try:
        yield
    except FloatingPointError as err:
        raise TrainingStopped(str(err)) from None
    except ValueError as err:
        if isinstance(err, UserError) or "invalid values" not in str(err):
            raise
        first = str(err).strip().splitlines()[0]
        raise TrainingStopped(f"non-finite values at {guard.where()}: {first}") from None


HEADLESS = {
    "trainer.logger": False,
    "trainer.enable_checkpointing": False,
    "trainer.enable_progress_bar": False,
    "trainer.enable_model_summary": False,
    "trainer.limit_val_batches": 0,
    "trainer.num_sanity_val_steps": 0,
}
"""The overrides that train a latent from a YAML inside another job (crossval's folds, the full-size
benchmark): no logger, checkpoint callback, progress bar, summary or validation of its own."""


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Lightning's info lines of every Trainer built and run (the seed, accelerators, tips, "max_epochs
    reached") hidden, and the warnings that say nothing about a latent (the frozen backbone's modules in
    eval mode, no loader workers): for a caller that trains many latents in one process."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.level, logging.WARNING))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")  # the frozen backbone
            warnings.filterwarnings("ignore", message=".*LeafSpec.*")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


# --------------------------------------------------------------------------- reading a YAML


@dataclass
class TrainingSpec:
    """What a training YAML says about the backbone, the latent, the data and the trainer, as written."""

    backbone: dict
    model: dict
    data: dict
    max_epochs: int
    trainer: dict


def read_yaml(path: str | Path) -> dict:
    """A training YAML's content.

    Raises:
        ConfigError: a missing file, one that is not a YAML mapping, or one that names a class by
            a path of the flat layout (:data:`FLAT_LAYOUT`).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"training config not found: {path}")
    text = path.read_text(encoding="utf-8")
    refuse_flat_layout(text, str(path))
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} is not a training config: a YAML mapping with trainer, model and data")
    return raw


def read_training_config(path: str | Path) -> TrainingSpec:
    """The parts of a training YAML that a caller reads before anything is built, checked for
    the mistakes that are cheap to find: no backbone, a latent setting ``LatentLM`` does not take.

    Raises:
        ConfigError: see :func:`read_yaml`; no ``vtrans.backbone.loading.Backbone``; an unknown latent setting.
    """
    raw = read_yaml(path)
    model = dict(raw.get("model") or {})
    backbone = model.pop("backbone", None)
    if not isinstance(backbone, dict) or not str(backbone.get("class_path", "")).endswith("Backbone"):
        raise ConfigError(f"{path}: model.backbone must be a vtrans.backbone.loading.Backbone with init_args")
    allowed = set(inspect.signature(LatentLM.__init__).parameters) - {"self", "backbone"}
    unknown = sorted(set(model) - allowed)
    if unknown:
        raise ConfigError(f"{path}: unknown latent setting(s) {', '.join(unknown)}: choose from {', '.join(sorted(allowed))}")
    trainer = dict(raw.get("trainer") or {})
    return TrainingSpec(
        backbone=dict(backbone.get("init_args") or {}),
        model=model,
        data=dict(raw.get("data") or {}),
        max_epochs=int(trainer.get("max_epochs") or 8),
        trainer=trainer,
    )


def _set(settings: dict, key: str, value: Any) -> None:
    """``settings[a][b] = value`` for ``key = "a.b"``, making the levels that are missing."""
    *path, last = key.split(".")
    for part in path:
        if not isinstance(settings.get(part), dict):
            settings[part] = {}
        settings = settings[part]
    settings[last] = value


def _parser_error(message: str) -> str:
    """jsonargparse's message as one line: ``trainer.max_epochs: Expected a <class 'int'>, given 'x'``."""
    keyed = re.match(r'Parser key "([^"]+)":\s*(.*)', message.strip(), re.S)
    if not keyed:
        return " ".join(message.split())
    key, detail = keyed.groups()
    given = re.search(r"(?:Given|Got) value: (.*)", detail)
    first = detail.strip().splitlines()[0].split(". Got value:")[0] if detail.strip() else "not accepted"
    return f"{key}: {first}" + (f", given {given.group(1).strip()!r}" if given else "")


def _name(config: str | Path | dict) -> str:
    return "the training config" if isinstance(config, dict) else str(config)
