"""Shared fixtures: tiny random backbones of both families and one tiny trained checkpoint.

Everything is offline and small. Session-scoped backbones are shared between tests: never
leave them changed (hooks, dropout, swapped blocks); use the context managers that restore.

Fixtures:
    tiny_gpt2, tiny_llama: ``vtrans.backbone.loading.Backbone`` (4 blocks, d=64, GPT-2 tokenizer).
    tiny_backbone: parametrised over both families.
    random_latent: a tiny conditional ``LatentLM`` on tiny-gpt2 with random heads and projection
        (z moves the logits, q differs from p), one per test module.
    run_train: ``run_train(*args, cwd=DIR)`` runs ``python train.py ARGS`` in a subprocess.
    tiny_fit: the result of ``train.py fit --config configs/tiny.yaml`` for one epoch in a
        temporary folder (``.root``, ``.ckpt``, ``.metrics``, ``.proc``).
    tiny_ckpt: the ``last.ckpt`` that fit wrote.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from vtrans import log
from vtrans.backbone.loading import Backbone

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TRAIN_PY = REPO / "train.py"


def offline_env() -> dict[str, str]:
    """The environment for subprocesses: no network, no Hugging Face telemetry."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", PYTHONUNBUFFERED="1")
    return env


def _run_train(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TRAIN_PY), *map(str, args)],
        cwd=cwd,
        env=offline_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(autouse=True)
def _fresh_log():
    """Every test starts with the logger a command line sets up without ``--quiet``: one that ran
    a command with ``--quiet`` leaves nothing behind for the next."""
    log.setup(quiet=False)
    yield


def pytest_collection_modifyitems(config, items):
    """``VTRANS_TEST_ORDER=reverse`` runs the tests last to first (``make test``'s second pass): a
    test that passes only because an earlier one left state behind (a session backbone changed, a
    global seed drawn from) fails there."""
    if os.environ.get("VTRANS_TEST_ORDER") == "reverse":
        items.reverse()


@pytest.fixture(scope="session")
def run_train():
    """``run_train(*args, cwd=DIR)``: ``python train.py ARGS`` in DIR, output captured."""
    return _run_train


@pytest.fixture(scope="session")
def tiny_gpt2() -> Backbone:
    return Backbone("tiny-gpt2")


@pytest.fixture(scope="session")
def tiny_llama() -> Backbone:
    return Backbone("tiny-llama")


@pytest.fixture(params=["tiny-gpt2", "tiny-llama"])
def tiny_backbone(request) -> Backbone:
    return request.getfixturevalue(request.param.replace("-", "_"))


@pytest.fixture(scope="module")
def random_latent(tiny_gpt2):
    """A tiny conditional latent with random heads and projection: z moves the logits, q differs from p."""
    from vtrans.latent.model import LatentModel

    assert tiny_gpt2.model.config.n_layer == 4
    with torch.random.fork_rng():
        torch.manual_seed(0)
        module = LatentModel(tiny_gpt2, d_z=4, prior="conditional", hidden=16).eval()
        with torch.no_grad():
            for linear, std in (
                (module.latent.posterior_head.net[-1], 0.2),
                (module.latent.prior_head.net[-1], 0.2),
                (module.latent.proj, 2.0),
            ):
                linear.weight.normal_(0.0, std)
    return module


@dataclass
class FitRun:
    """A finished ``train.py fit`` run in its own folder."""

    root: Path
    proc: subprocess.CompletedProcess

    @property
    def ckpt(self) -> Path:
        return self.root / "checkpoints" / "tiny" / "last.ckpt"

    @property
    def metrics(self) -> Path:
        return self.root / "runs" / "tiny" / "version_0" / "metrics.csv"

    def describe(self) -> str:
        return f"exit code {self.proc.returncode}\n--- stderr (tail) ---\n{self.proc.stderr[-3000:]}"


@pytest.fixture(scope="session")
def tiny_fit(tmp_path_factory) -> FitRun:
    """``train.py fit --config configs/tiny.yaml`` for one epoch; relative output paths land in root."""
    root = tmp_path_factory.mktemp("tiny_fit")
    proc = _run_train(
        "fit",
        "--config",
        CONFIGS / "tiny.yaml",
        "--trainer.max_epochs",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        cwd=root,
    )
    return FitRun(root, proc)


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_fit) -> Path:
    """A checkpoint of a tiny latent (tiny-gpt2, conditional prior, d_z=8) after one epoch."""
    if not tiny_fit.ckpt.is_file():
        pytest.fail(f"the tiny fit wrote no checkpoint: {tiny_fit.describe()}")
    return tiny_fit.ckpt
