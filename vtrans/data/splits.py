"""The seeded split of idioms into train, val and test, by a stable hash of the normalised idiom."""

from __future__ import annotations

import hashlib

from vtrans.data.formats import SPLITS, load_idioms, parse_spec
from vtrans.data.items import DataError, IdiomItem, idiom_key


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= value < 1:
            raise DataError(f"{name}={value} is out of range; use a value in [0, 1)")
    if val_fraction + test_fraction >= 1:
        raise DataError(
            f"val_fraction + test_fraction = {val_fraction + test_fraction} leaves nothing to train on; keep the sum below 1"
        )


def _split_of(key: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    digest = hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64  # uniform in [0, 1)
    if u < test_fraction:
        return "test"
    return "val" if u < test_fraction + val_fraction else "train"


def split_items(
    items: list[IdiomItem],
    split: str,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
) -> list[IdiomItem]:
    """The items of one split, in input order.

    Each idiom goes to a split by a stable hash of (seed, normalised idiom), so an
    idiom's split depends on nothing else: not file order, not other idioms, not
    ``PYTHONHASHSEED``.

    Args:
        items: Items to split.
        split: ``train``, ``val``, ``test`` or ``all``.
        seed: Seed of the split; a different seed gives a different split.
        val_fraction: Expected fraction of idioms in ``val``, in [0, 1).
        test_fraction: Expected fraction of idioms in ``test``, in [0, 1).

    Returns:
        The items whose idiom falls in ``split`` (all of them for ``all``).

    Raises:
        DataError: On an unknown split name or invalid fractions.
    """
    if split not in (*SPLITS, "all"):
        raise DataError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}, all")
    check_fractions(val_fraction, test_fraction)
    if split == "all":
        return list(items)
    return [
        item
        for item in items
        if _split_of(idiom_key(item.idiom), seed, val_fraction, test_fraction) == split
    ]


def load_split(
    spec: str,
    split: str | None = None,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
) -> list[IdiomItem]:
    """Load one split of a data spec.

    Args:
        spec: A data spec (see :func:`parse_spec`).
        split: The split to use unless the spec names one (``builtin:test``);
            None means ``all``.
        seed: Seed of the split.
        val_fraction: Expected fraction of idioms in ``val``.
        test_fraction: Expected fraction of idioms in ``test``.

    Returns:
        The items of the split.
    """
    kind, arg = parse_spec(spec)
    chosen = (arg if kind == "builtin" else None) or split or "all"
    return split_items(load_idioms(spec), chosen, seed, val_fraction, test_fraction)
