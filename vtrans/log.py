"""What the package tells its user on stderr, and how ``--quiet`` silences it.

Library code reports through the ``vtrans`` logger (``log.info``, ``log.warning``), never with
``print``; a command line calls :func:`setup` once, which decides what reaches stderr:

* by default, the package's warnings and one line per phase (:func:`phase`: loading,
  completing, scoring, fitting each fitted estimator), and nothing from the libraries that a user cannot
  act on (transformers' weight-loading bars and deprecation notes, Lightning's tips);
* with ``quiet``, only errors: a successful run writes nothing to stderr.

Progress bars (tqdm) are the package's own and follow the same switch (:func:`bars_enabled`).
A program that imports vtrans without calling :func:`setup` gets Python's defaults: the
``vtrans`` logger's warnings on stderr, its info lines nowhere.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
import warnings
from collections.abc import Iterator

log = logging.getLogger("vtrans")

_state = {"quiet": False, "configured": False}

# messages of the libraries that say nothing a user of vtrans can act on
_LIBRARY_NOISE = (
    r".*does not have many workers.*",
    r".*LeafSpec.*",
    r".*`resume_download` is deprecated.*",
    r".*torch_dtype.*is deprecated.*",
)


def setup(quiet: bool = False) -> None:
    """Route the package's messages to stderr and silence the libraries' (see the module docstring)."""
    _state["quiet"], _state["configured"] = quiet, True
    handler = _Stderr()
    handler.setFormatter(_Formatter())
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.ERROR if quiet else logging.INFO)
    quiet_libraries()


class _Stderr(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is when a message comes (a process that
    redirects it later, or a test that captures it, gets the messages)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _Formatter(logging.Formatter):
    """The message alone; a warning's begins ``warning: ``, an error's ``error: ``."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.ERROR:
            return f"error: {message}"
        return f"warning: {message}" if record.levelno >= logging.WARNING else message


def quiet_libraries() -> None:
    """transformers', huggingface_hub's and Lightning's chatter off: progress bars, info and
    deprecation notes (their errors still propagate as exceptions)."""
    for name in ("transformers", "huggingface_hub", "lightning", "lightning.pytorch", "lightning.fabric", "pyro"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for pattern in _LIBRARY_NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    with contextlib.suppress(ImportError):
        import transformers.utils.logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    with contextlib.suppress(ImportError):
        import huggingface_hub.utils as hub_utils

        hub_utils.disable_progress_bars()


def bars_enabled(wanted: bool = True) -> bool:
    """Whether a progress bar may be drawn: asked for, and not silenced by ``--quiet``."""
    return wanted and not _state["quiet"]


@contextlib.contextmanager
def phase(what: str, done: str | None = None) -> Iterator[dict]:
    """One line on stderr when a phase ends: ``done`` (default ``what``) and its seconds.

    The yielded dict may be filled in while the phase runs: ``{"n": 86}`` is formatted into
    ``done`` (``"completed {n} prompts"``).
    """
    info: dict = {}
    start = time.perf_counter()
    yield info
    message = (done or what).format(**info)
    log.info(f"{message} ({time.perf_counter() - start:.1f} s)")
