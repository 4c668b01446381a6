"""The DataModule: batches of idiom items for training, with a shuffle that resumes exactly.

The items, their formats and splits are ``vtrans.data``'s (plain Python, which scoring reads
without Lightning); this module turns them into Lightning's loaders.
"""

from __future__ import annotations

from collections.abc import Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, RandomSampler

from vtrans.config import check_all
from vtrans.data import (
    DEFAULT_TEMPLATE,
    SPLITS,
    DataError,
    IdiomItem,
    idiom_hash,
    load_split,
    parse_spec,
    render_prompt,
    validate_template,
    with_answer_words,
)
from vtrans.data.splits import check_fractions
from vtrans.errors import ConfigError
from vtrans.log import log

BATCH_KEYS = ("idiom", "prefix", "target", "prompt")


def collate_rows(rows: list[dict[str, str]]) -> dict[str, list[str]]:
    """Batch rows into a dict of lists of str with keys :data:`BATCH_KEYS`."""
    return {key: [row[key] for row in rows] for key in BATCH_KEYS}


def _rows(items: list[IdiomItem], template: str) -> list[dict[str, str]]:
    return [
        {
            "idiom": it.idiom,
            "prefix": it.prefix,
            "target": it.target,
            "prompt": render_prompt(template, it.prefix),
        }
        for it in items
    ]


class EpochShuffle(RandomSampler):
    """A random order that is a function of (seed, epoch) alone.

    Lightning calls ``set_epoch`` before every training epoch, so a run resumed at epoch e
    sees the same order as an uninterrupted run does at epoch e (a generator seeded once per
    ``train_dataloader`` call would restart its sequence on resume). Under a distributed
    strategy Lightning replaces a ``RandomSampler`` by a ``DistributedSampler``, which also
    shuffles by (seed, epoch).
    """

    def __init__(
        self, data_source, seed: int = 0, lengths: list[int] | None = None, batch_size: int = 1, pool: int = 50
    ) -> None:
        super().__init__(data_source)
        self.seed, self.epoch = seed, 0
        self.lengths, self.batch_size, self.pool = lengths, batch_size, pool

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2**63)
        order = torch.randperm(len(self.data_source), generator=generator).tolist()
        if self.lengths is None:
            yield from order
            return
        # length buckets: within pools of `pool` batches, sort by length and cut into batches,
        # then shuffle the batches, so each batch holds items of similar length (little padding)
        span = self.pool * self.batch_size
        batches = []
        for start in range(0, len(order), span):
            chunk = sorted(order[start : start + span], key=lambda i: self.lengths[i])
            batches += [chunk[j : j + self.batch_size] for j in range(0, len(chunk), self.batch_size)]
        for b in torch.randperm(len(batches), generator=generator).tolist():
            yield from batches[b]


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_settings(
    data: str,
    template: str,
    batch_size: int,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    num_workers: int,
    max_items: int | None,
    length_bucketed: bool,
    answer_words: int = 1,
) -> None:
    """Check the DataModule's settings when they are given, before any data is read.

    Raises:
        ConfigError: the first setting out of range or of the wrong kind, with what is allowed.
            A data spec naming a file that does not exist is found later, in ``setup``.
    """
    checks = [
        (isinstance(data, str), f"data must be a data spec (builtin, builtin:SPLIT or KIND:PATH), got {data!r}"),
        (isinstance(template, str), f"template must be a string with the field {{prefix}}, got {template!r}"),
        (_whole(batch_size) and batch_size >= 1, f"batch_size must be a whole number >= 1, got {batch_size!r}"),
        (_whole(seed), f"seed must be a whole number, got {seed!r}"),
        (
            _whole(num_workers) and num_workers >= 0,
            f"num_workers must be a whole number >= 0 (0: load in the main process), got {num_workers!r}",
        ),
        (
            max_items is None or (_whole(max_items) and max_items >= 1),
            f"max_items must be a whole number >= 1, or null to keep every item, got {max_items!r}",
        ),
        (isinstance(length_bucketed, bool), f"length_bucketed must be true or false, got {length_bucketed!r}"),
        (
            _whole(answer_words) and answer_words >= 1,
            f"answer_words must be a whole number >= 1 (the words of each answer), got {answer_words!r}",
        ),
    ]
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        checks.append((is_number, f"{name} must be a number in [0, 1), got {value!r}"))
    check_all(checks)
    try:  # the checks that the data functions share with evaluate and score
        parse_spec(data)
        validate_template(template)
        check_fractions(val_fraction, test_fraction)
    except DataError as err:
        raise ConfigError(str(err)) from None


class IdiomDataModule(L.LightningDataModule):
    """Idiom-completion batches: dicts of lists of str with keys idiom, prefix, target, prompt.

    Tokenisation happens in the LightningModule. ``predict`` uses the test split. Its
    ``state_dict`` (which Lightning saves into every checkpoint, under the class name) records the
    idioms the latent was trained on, as sorted :func:`idiom_hash` values, so that evaluation can
    leave them out whatever the training data was.
    """

    def __init__(
        self,
        data: str = "builtin",
        template: str = DEFAULT_TEMPLATE,
        batch_size: int = 32,
        seed: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        num_workers: int = 0,
        max_items: int | None = None,
        length_bucketed: bool = False,
        answer_words: int = 1,
    ) -> None:
        """Check the settings (see :func:`check_settings`); data is read in ``setup``.

        Args:
            data: Data spec: ``builtin`` (the packaged idiom set), ``builtin:SPLIT``
                (every stage uses that split), ``txt:PATH`` or ``epie:PATH`` (one idiom
                per line), ``slide:PATH`` (SLIDE TSV, column ``Idiom``) or
                ``magpie:PATH`` (MAGPIE JSONL, field ``idiom``) or ``wordnet:PATH`` (a WordNet database directory or one of its data.POS files: its multi-word expressions).
            template: Prompt template with the single field ``{prefix}``.
            batch_size: Items per batch, at least 1.
            seed: Seed of the idiom split and of the training shuffle.
            val_fraction: Expected fraction of idioms in the validation split, in [0, 1).
            test_fraction: Expected fraction of idioms in the test split, in [0, 1);
                val_fraction + test_fraction must be below 1.
            num_workers: DataLoader worker processes (0: load in the main process).
            max_items: Keep only the first N items of each split (quick runs); None keeps all.
            length_bucketed: Group training items of similar prompt length into batches
                (less padding); the batches are still shuffled by (seed, epoch).
            answer_words: K, the words of each answer: an item's target is its idiom's last K
                words (the ELBO's likelihood covers all their tokens); an idiom too short to keep
                a prompt of two words is left out, and counted in the log.
        """
        super().__init__()
        check_settings(
            data, template, batch_size, seed, val_fraction, test_fraction, num_workers, max_items, length_bucketed, answer_words
        )
        self.save_hyperparameters()
        self.items: dict[str, list[IdiomItem]] = {}
        self.trained_before: set[str] = set()  # hashes from the checkpoint a run resumes from

    @classmethod
    def from_items(
        cls,
        train: list[IdiomItem],
        val: list[IdiomItem] | None = None,
        template: str = DEFAULT_TEMPLATE,
        batch_size: int = 32,
        seed: int = 0,
        length_bucketed: bool = False,
        answer_words: int = 1,
    ) -> IdiomDataModule:
        """A DataModule over items chosen by the caller (cross-fitting: one fold's training idioms).

        ``seed`` drives the training shuffle only: nothing is split here; ``answer_words`` is
        recorded only (the items' targets are already the answers).
        """
        module = cls(
            template=template, batch_size=batch_size, seed=seed, length_bucketed=length_bucketed, answer_words=answer_words
        )
        module.items = {"train": list(train), "val": list(val or []), "test": []}
        module._given = True
        return module

    def _load(self, split: str) -> None:
        if getattr(self, "_given", False):
            return
        hp = self.hparams
        items = load_split(hp.data, split, hp.seed, hp.val_fraction, hp.test_fraction)
        items, short = with_answer_words(items, self.answer_words)
        if short:
            log.info(f"{split}: left out {short} idioms too short for answers of {self.answer_words} words")
        self.items[split] = items[: hp.max_items] if hp.max_items is not None else items

    @property
    def answer_words(self) -> int:
        """K, the words of each answer (1 for a checkpoint written before answers had more)."""
        return self.hparams.get("answer_words", 1)

    def setup(self, stage: str | None = None) -> None:
        """Load the splits a stage needs: fit (train, val), validate, test, predict (test)."""
        needed = {"fit": SPLITS[:2], "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in needed.get(stage, SPLITS) if stage else SPLITS:
            self._load(split)
        if stage == "fit" and parse_spec(self.hparams.data)[1] in (*SPLITS, "all"):
            raise DataError(
                f"data {self.hparams.data!r} names one split, but fit needs separate train and val splits; use 'builtin'"
            )
        if stage == "fit" and not self.items["train"]:
            raise DataError(
                f"the train split of {self.hparams.data!r} is empty; use more idioms or smaller val/test fractions"
            )

    def state_dict(self) -> dict[str, list[str]]:
        """The training idioms, hashed: this run's train split (as loaded, after ``max_items``) and a resumed run's."""
        trained = self.trained_before | {idiom_hash(item.idiom) for item in self.items.get("train", [])}
        return {"train_idiom_hashes": sorted(trained)} if trained else {}

    def load_state_dict(self, state_dict: dict[str, list[str]]) -> None:
        """Keep the training idioms of the checkpoint a run resumes from: the latent has seen them too."""
        self.trained_before = set(state_dict.get("train_idiom_hashes", []))

    def _sampler(self, rows: list[dict[str, str]]) -> EpochShuffle:
        if not self.hparams.get("length_bucketed", False):
            return EpochShuffle(rows, self.hparams.seed)
        lengths = [len(row["prompt"]) + len(row["target"]) for row in rows]  # characters: a cheap proxy
        return EpochShuffle(rows, self.hparams.seed, lengths, self.hparams.batch_size)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.items:
            self._load(split)
        rows = _rows(self.items[split], self.hparams.template)
        return DataLoader(
            rows,
            batch_size=self.hparams.batch_size,
            sampler=self._sampler(rows) if shuffle else None,
            num_workers=self.hparams.num_workers,
            collate_fn=collate_rows,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches: epoch e's order depends on (``seed``, e) only (see :class:`EpochShuffle`)."""
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in file order."""
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches in file order."""
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """Test-split batches in file order."""
        return self._loader("test", shuffle=False)
