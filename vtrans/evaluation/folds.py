"""The folds of a cross-fitted run: the idioms each one scores and trains on, and the latent it trains.

The items are cut into K folds by a seeded hash of the normalised idiom (balanced, and
independent of file order). Extra training idioms (``--extra_train``) join every fold's training
set, except those that are a scored idiom or a variant of one (:class:`FoldPlan`).

Each fold's latent is trained as ``train.py fit`` trains one from the same YAML
(:func:`vtrans.training.build`: its callbacks, checkpoint writer, precision, accelerator and
devices), on the fold's training idioms, seeded by the training seed, with no validation split,
logger or checkpoint callback of its own; the latent is written beside the run's units
(:class:`FoldLatents`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from vtrans.backbone.frozen import FrozenCache
from vtrans.backbone.loading import Backbone
from vtrans.config import CrossvalConfig
from vtrans.data import IdiomItem, idiom_hash, idiom_key, load_idioms, parse_spec, with_answer_words
from vtrans.errors import ConfigError, TrainingStopped
from vtrans.latent import checkpoint, training
from vtrans.latent.training import TrainingSpec


def assign_folds(items: list[IdiomItem], folds: int, seed: int = 0) -> list[int]:
    """Fold of each item: items sorted by a seeded hash of the normalised idiom, dealt round-robin.

    The folds differ in size by at most one, and an idiom's fold depends on the seed and the set
    of idioms only, not on file order.
    """

    def key(item: IdiomItem) -> bytes:
        return hashlib.blake2b(f"fold\0{seed}\0{idiom_key(item.idiom)}".encode(), digest_size=8).digest()

    order = sorted(range(len(items)), key=lambda i: key(items[i]))
    assigned = [0] * len(items)
    for rank, i in enumerate(order):
        assigned[i] = rank % folds
    return assigned


def _variant_key(item: IdiomItem) -> tuple[str, str]:
    """An idiom's first and last word, normalised: what two spellings of one idiom share."""
    return idiom_key(item.prefix).split(" ")[0], idiom_key(item.target)


def extra_training_items(extra: list[IdiomItem], scored: list[IdiomItem]) -> list[IdiomItem]:
    """The extra training idioms that are no scored idiom, nor a variant of one.

    An extra idiom is dropped when its normalised form equals a scored one's, or when it shares
    a scored idiom's first and last word ("beat around the bush" and "beat about the bush",
    "blow one's stack" and "blow your stack"), so that no scored idiom is trained on in
    another spelling.
    """
    keys = {idiom_key(it.idiom) for it in scored}
    variants = {_variant_key(it) for it in scored}
    return [it for it in extra if idiom_key(it.idiom) not in keys and _variant_key(it) not in variants]


@dataclass(frozen=True)
class FoldPlan:
    """The idioms a cross-fitted run scores, the fold of each, and the extra idioms every fold trains on.

    Attributes:
        data: the data spec the scored idioms come from.
        items: the scored idioms, in file order.
        folds: the fold of each item (0 for all with one fold).
        k: the number of folds.
        extra: the extra training idioms that remain (see :func:`extra_training_items`).
        n_extra_dropped: how many extra idioms were left out as scored idioms or variants of one.
        answer_words: K, the words of each item's answer.
        n_short: how many idioms were left out as too short for answers of K words (scored and
            extra ones together).
    """

    data: str
    items: list[IdiomItem]
    folds: list[int]
    k: int
    extra: list[IdiomItem]
    n_extra_dropped: int
    answer_words: int = 1
    n_short: int = 0

    @classmethod
    def load(
        cls,
        data: str,
        k: int,
        fold_seed: int = 0,
        max_items: int | None = None,
        extra_train: str | None = None,
        answer_words: int = 1,
    ) -> FoldPlan:
        """Read the idioms (the first ``max_items``) and the extra ones, and deal the folds.

        The folds are dealt over the idioms as read, before those too short for answers of
        ``answer_words`` words are left out: an idiom is in the same fold at every K.

        Raises:
            ConfigError: one split of the built-in set (cross-fitting scores every idiom of a
                set), or too few idioms for ``k`` folds.
        """
        kind, split = parse_spec(data)
        if kind == "builtin" and split not in (None, "all"):
            raise ConfigError(f"cross-fitting uses every idiom of a set: write {kind}, not {data}")
        items = load_idioms(data)[:max_items] if max_items else load_idioms(data)
        if len(items) < 2 * k:
            raise ConfigError(f"{data} has {len(items)} idioms: too few for {k} folds")
        folds = assign_folds(items, k, fold_seed) if k > 1 else [0] * len(items)
        extra, dropped = [], 0
        if extra_train:
            offered = load_idioms(extra_train)
            extra = extra_training_items(offered, items)
            dropped = len(offered) - len(extra)
        if answer_words == 1:
            return cls(data, items, folds, k, extra, dropped)
        fold_of = {idiom_key(it.idiom): f for it, f in zip(items, folds, strict=True)}
        kept, short = with_answer_words(items, answer_words)
        extra, short_extra = with_answer_words(extra, answer_words)
        if len(kept) < 2 * k:
            raise ConfigError(f"{data} has {len(kept)} idioms long enough for answers of {answer_words} words: too few for {k} folds")
        folds = [fold_of[idiom_key(it.idiom)] for it in kept]
        return cls(data, kept, folds, k, extra, dropped, answer_words, short + short_extra)

    def inside(self, fold: int) -> list[int]:
        """The indices of the items of ``fold``: what its latent scores."""
        return [i for i, f in enumerate(self.folds) if f == fold]

    def outside(self, fold: int) -> list[int]:
        """The indices of the items of every other fold: what its latent trains on (with the extra idioms)."""
        return [i for i, f in enumerate(self.folds) if f != fold]

    def digest(self) -> str:
        """A short hash of every scored item with its fold, and of the extra idioms."""
        digest = hashlib.sha256()
        for it, fold in zip(self.items, self.folds, strict=True):
            digest.update(f"{it.idiom}\0{it.prefix}\0{it.target}\0{fold}\n".encode())
        for it in self.extra:
            digest.update(f"extra\0{it.idiom}\0{it.prefix}\0{it.target}\n".encode())
        return digest.hexdigest()[:16]


def latent_file(seed: int, fold: int, member: int = 0) -> str:
    """The file name of the latent of (seed, fold), and of its ensemble's member m >= 1."""
    return f"seed{seed}-fold{fold}.ckpt" if member == 0 else f"seed{seed}-fold{fold}-member{member}.ckpt"


class FoldLatents:
    """The backbone, and the latent of each (seed, fold): trained from the training YAML, or loaded.

    ``device`` ``auto`` trains where the YAML's trainer says (``trainer.accelerator``,
    ``trainer.devices``); a device named overrides them. Either way one device, in this process:
    the backbone and its frozen states (one :class:`vtrans.frozen.FrozenCache` for every fold and
    seed) are shared by every latent. An item's frozen states are computed on their own, so
    they are the same whichever folds trained before (in this process or an earlier one).
    """

    def __init__(
        self, cfg: CrossvalConfig, spec: TrainingSpec, template: str, out: Path, device: str = "auto"
    ) -> None:
        self.cfg, self.spec, self.template, self.out, self.asked = cfg, spec, template, out, device
        self.backbone = Backbone(**self.spec.backbone)
        self.frozen = FrozenCache()
        try:
            with training.quiet():  # the whole config checked before any work, and its device read
                trainer = training.build(cfg.config, self.overrides(cfg.seeds[0]), backbone=self.backbone).trainer
        except ConfigError as err:
            hint = " (--device names another device to train on)" if device == "auto" and "trainer" in str(err) else ""
            raise ConfigError(f"{err}{hint}") from None
        if trainer.world_size > 1:
            raise ConfigError(
                f"{cfg.config} trains in {trainer.world_size} processes (trainer.devices, num_nodes): "
                "crossval trains every fold in its own process on one device; give --device or set trainer.devices: 1"
            )
        self.device = str(trainer.strategy.root_device)
        self.backbone.to(self.device)

    def overrides(self, seed: int) -> dict:
        """What a fold changes in the training YAML: its seed, epochs, template and device, and no
        validation, progress bar, logger or checkpoint callback."""
        settings = {
            "seed_everything": seed,
            "data.seed": seed,
            "data.template": self.template,
            "data.answer_words": self.cfg.eval.answer_words,
            "trainer.max_epochs": self.cfg.epochs or self.spec.max_epochs,
            "trainer.default_root_dir": str(self.out),
            **training.HEADLESS,
        }
        if self.asked != "auto":  # one device named: the config's accelerator, devices and strategy give way
            kind, _, index = self.asked.partition(":")
            settings["trainer.accelerator"] = "gpu" if kind == "cuda" else kind
            settings["trainer.devices"] = [int(index)] if index else 1
            settings["trainer.strategy"] = "auto"
        return settings

    def latent(
        self, seed: int, fold: int, train: list[IdiomItem], member: int = 0
    ) -> tuple[torch.nn.Module, dict[str, float]]:
        """The latent of (seed, fold), in eval mode, and its last training epoch's statistics;
        ``member`` m >= 1: the ensemble's m-th latent, trained from seed s + 1000·m.

        A latent it trains is written to ``OUT/units/`` as :func:`latent_file` names it (and to
        ``OUT/checkpoints/`` with ``save_checkpoints``).

        Raises:
            TrainingStopped: a non-finite value stopped the training (the message names the seed and fold).
        """
        name = latent_file(seed, fold, member)
        if self.cfg.from_checkpoints:
            return self._load(name, train), {}
        with training.quiet():
            overrides = self.overrides(self.cfg.member_seed(seed, member))
            built = training.build(self.cfg.config, overrides, train, self.backbone, self.frozen)
            try:
                training.fit(built)
            except TrainingStopped as err:
                which = f", member {member}" if member else ""
                raise TrainingStopped(f"seed {seed}, fold {fold + 1}/{self.cfg.folds}{which}: {err}") from None
        logged = built.trainer.callback_metrics
        stats = {k.removeprefix("train/"): float(v) for k, v in logged.items() if k.startswith("train/")}
        for folder in ("units", "checkpoints") if self.cfg.save_checkpoints else ("units",):
            built.trainer.save_checkpoint(self.out / folder / name, weights_only=True)
        return built.module.model.eval(), stats

    def _load(self, name: str, train: list[IdiomItem]):
        """The latent ``name`` from ``from_checkpoints``, refused unless it trained on ``train`` exactly."""
        path = Path(self.cfg.from_checkpoints) / name
        if not path.is_file():
            raise ConfigError(
                f"{path} not found: --from_checkpoints needs {name} "
                "(an earlier run's OUT/units, or its OUT/checkpoints with --save_checkpoints)"
            )
        contents = checkpoint.read(path)
        recorded = checkpoint.trained_idiom_hashes(contents)
        wanted = {idiom_hash(it.idiom) for it in train}
        if recorded != wanted:
            have = "no record of its idioms" if recorded is None else f"{len(recorded)} recorded idioms, {len(recorded ^ wanted)} differ"
            raise ConfigError(
                f"{path} was not trained on this fold's {len(wanted)} training idioms ({have}): "
                "use the same --data, --folds, --fold_seed, --extra_train and --self_targets as the run that wrote it"
            )
        return checkpoint.load(path, self.device, backbone=self.backbone, ckpt=contents)  # to score with: no training, no frozen cache
