"""Command lines: ``python train.py`` (LightningCLI) and ``vtrans fit|evaluate|crossval|score|estimators``.

* ``entry``: the entry points (:func:`main`, the ``vtrans`` command; :func:`train_main`, ``train.py``),
  the subcommands and their parsers;
* ``commands``: what each subcommand does, and how a command ends on a user's error;
* ``parsing``: typed options from signatures and dataclasses, and parse errors in one line.
"""

from vtrans.cli.entry import main, train_main

__all__ = ["main", "train_main"]
