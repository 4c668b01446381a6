"""A long run's finished units of work on disk, so that a run that was killed resumes where it stopped.

A run is cut into named units, each computed once and written under its folder as ``NAME.json``
the moment it is finished: to a temporary file, flushed, then renamed over its name, so that a
unit's file is whole or absent whatever stops the process. The run's settings come first
(``manifest.json``); a later run on the same folder reads the finished units instead of
computing them again, and is refused when its settings differ (its units would mix two runs).

Each unit records the seconds it took, and :attr:`Units.seconds` adds up those of the units a
run has used: a resumed run counts every unit once, at its own recorded time, so that what it
assembles from its units (timings included) is the same as an uninterrupted run's. A unit also
records where it ran (the ``stamp`` a run gives: for a cross-fitted run, the thread count and
the torch version, on which a trained latent's last bits depend) and :attr:`Units.stamps`
gathers those of the units used.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vtrans.errors import ConfigError


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file beside it and a rename: whole or not at all."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def differences(recorded: Any, wanted: Any, prefix: str = "") -> list[str]:
    """Each setting that differs, as ``key (recorded there, wanted here)``, nested keys dotted."""
    if isinstance(recorded, dict) and isinstance(wanted, dict):
        found = []
        for key in [*recorded, *(k for k in wanted if k not in recorded)]:
            found += differences(recorded.get(key), wanted.get(key), f"{prefix}.{key}" if prefix else str(key))
        return found
    return [] if recorded == wanted else [f"{prefix} ({recorded!r} there, {wanted!r} here)"]


class Units:
    """The finished units of one run, in ``folder``, under a manifest of the run's settings.

    Attributes:
        seconds: the recorded seconds of every unit :meth:`record` has returned.
        stamps: the distinct stamps of those units, in the order first met (a unit recorded
            before stamps existed has none and adds none).
        computed: the names of the units computed by this process (the others were read back).

    Raises:
        ConfigError: (on creation) the folder holds the units of a run whose manifest differs.
    """

    def __init__(
        self,
        folder: str | Path,
        manifest: dict[str, Any],
        free: tuple[str, ...] = (),
        stamp: dict[str, Any] | None = None,
    ) -> None:
        """Args:
            free: settings that may differ between runs sharing the folder, because no unit
                depends on them (a cross-fitted run's ``seeds``: each seed's units are its own,
                named by it, so a run can be extended by more seeds).
            stamp: where this process computes (plain JSON data), recorded in each unit it computes;
                not a setting: units computed elsewhere are read back all the same.
        """
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob(".*.tmp"):  # a write that a kill interrupted
            stale.unlink(missing_ok=True)
        manifest = json.loads(json.dumps(manifest))  # as it reads back
        path = self.folder / "manifest.json"
        if path.is_file():
            recorded = self._read(path)
            recorded = {k: v for k, v in recorded.items() if k not in free}
            found = differences(recorded, {k: v for k, v in manifest.items() if k not in free})
            if found:
                raise ConfigError(
                    f"{self.folder} holds the units of a run with other settings: {'; '.join(found[:3])}"
                    f"{f' and {len(found) - 3} more' if len(found) > 3 else ''}: "
                    "run it with the settings it was written with, or give another --out"
                )
        else:
            write_atomic(path, json.dumps(manifest, indent=1) + "\n")
        self.stamp = json.loads(json.dumps(stamp)) if stamp else None
        self.seconds = 0.0
        self.stamps: list[dict[str, Any]] = []
        self.computed: set[str] = set()

    def finished(self) -> list[str]:
        """The names of the units recorded so far."""
        return sorted(p.stem for p in self.folder.glob("*.json") if p.name != "manifest.json")

    def record(self, name: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """The unit ``name``: read back if it is finished, else computed and written first.

        ``compute`` returns plain JSON data (NaN allowed); what is returned is that data as it
        reads back from the file, in both cases, so that a resumed run computes with exactly
        what an uninterrupted one did.
        """
        path = self.folder / f"{name}.json"
        if path.is_file():
            unit = self._read(path)
        else:
            start = time.perf_counter()
            unit = {"record": compute()}
            unit["seconds"] = time.perf_counter() - start
            if self.stamp is not None:
                unit["stamp"] = self.stamp
            text = json.dumps(unit)
            write_atomic(path, text + "\n")
            unit = json.loads(text)
            self.computed.add(name)
        self.seconds += unit["seconds"]
        if unit.get("stamp") is not None and unit["stamp"] not in self.stamps:
            self.stamps.append(unit["stamp"])
        return unit["record"]

    @staticmethod
    def _read(path: Path) -> dict[str, Any]:
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ConfigError(f"{path} cannot be read ({err}): delete it, and the run computes it again") from None
