"""``python -m vtrans.cli``: the ``vtrans`` command."""

from vtrans.cli.entry import main

main()
