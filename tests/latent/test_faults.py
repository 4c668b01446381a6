"""Faults in training: atomic checkpoints, kill-and-resume equality, a NaN loss stops the run.

The training runs are ``train.py fit`` subprocesses on the tiny config (a random 4-block
GPT-2, 64 idioms, 4 steps an epoch); faults come from the callbacks in ``helpers_kill``.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from vtrans.latent import checkpoint
from vtrans.latent.callbacks import NonFiniteGuard, ResumableRNG
from vtrans.latent.checkpoint_io import AtomicCheckpointIO, NonFiniteCheckpointError, non_finite_tensors
from vtrans.latent.datamodule import EpochShuffle, IdiomDataModule

REPO = Path(__file__).resolve().parents[2]
TESTS = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 4  # tiny.yaml: max_items 64, batch_size 16


# --------------------------------------------------------------------------- atomic writes


def _half_then_fail(real_save):
    """A torch.save that writes half of the checkpoint, then fails (a full disk, a crash)."""

    def save(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        f.flush()
        raise OSError(28, "No space left on device")

    return save


def test_failure_mid_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch, tiny_ckpt) -> None:
    target = tmp_path / "last.ckpt"
    io_plugin = AtomicCheckpointIO()
    previous = checkpoint.read(tiny_ckpt)
    io_plugin.save_checkpoint(previous, target)
    before = target.read_bytes()

    newer = checkpoint.read(tiny_ckpt)
    newer["global_step"] = 999
    newer["state_dict"] = {k: v + 1 for k, v in newer["state_dict"].items()}
    monkeypatch.setattr(torch, "save", _half_then_fail(torch.save))
    with pytest.raises(OSError, match="No space left"):
        io_plugin.save_checkpoint(newer, target)
    monkeypatch.undo()

    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # the temporary file is gone
    module = checkpoint.load(target)  # still a whole, loadable checkpoint
    for key, value in previous["state_dict"].items():
        torch.testing.assert_close(module.state_dict()[key], value)


def test_kill_mid_save_leaves_previous_checkpoint_intact(tmp_path) -> None:
    """A process SIGKILLed halfway through writing: the old file is whole, the new one never appears."""
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.arange(100_000.0)}, "global_step": 1}, target)
    before = target.read_bytes()
    script = textwrap.dedent(
        f"""
        import io, os, signal, torch
        from vtrans.latent.checkpoint_io import AtomicCheckpointIO
        real = torch.save
        def save(obj, f, *a, **k):
            buf = io.BytesIO(); real(obj, buf)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2]); f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = save
        AtomicCheckpointIO().save_checkpoint({{"state_dict": {{"w": torch.zeros(100_000)}}, "global_step": 2}}, {str(target)!r})
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert target.read_bytes() == before
    loaded = AtomicCheckpointIO().load_checkpoint(target)
    assert loaded["global_step"] == 1 and torch.equal(loaded["state_dict"]["w"], torch.arange(100_000.0))


def test_save_is_a_replace_and_keeps_permissions_readable(tmp_path) -> None:
    target = tmp_path / "sub" / "a.ckpt"
    plugin = AtomicCheckpointIO()
    plugin.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, target)
    plugin.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 2}, target)
    assert plugin.load_checkpoint(target)["global_step"] == 2
    assert os.stat(target).st_mode & 0o444 == 0o444 & ~_umask()
    assert [p.name for p in target.parent.iterdir()] == ["a.ckpt"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_checkpoint_with_non_finite_tensors_is_not_written(tmp_path) -> None:
    target = tmp_path / "nan.ckpt"
    bad = {"global_step": 7, "state_dict": {"latent.proj.weight": torch.tensor([1.0, float("nan")])}}
    with pytest.raises(NonFiniteCheckpointError, match=r"step 7.*state_dict\.latent\.proj\.weight"):
        AtomicCheckpointIO().save_checkpoint(bad, target)
    assert not list(tmp_path.iterdir())
    infinite = {"optimizer_states": [{"state": {0: {"exp_avg": torch.tensor([float("inf")])}}}]}
    assert list(non_finite_tensors(infinite)) == ["optimizer_states[0].state.0.exp_avg"]
    with pytest.raises(NonFiniteCheckpointError, match="exp_avg"):
        AtomicCheckpointIO().save_checkpoint(infinite, target)
    legit = {"state_dict": {"w": torch.ones(2)}, "callbacks": {"ModelCheckpoint": {"kth_value": torch.tensor(float("inf"))}}}
    AtomicCheckpointIO().save_checkpoint(legit, target)  # a callback's inf is not training's
    assert list(non_finite_tensors({"rng": torch.zeros(4, dtype=torch.uint8), "x": torch.ones(2)})) == []


def test_resumable_rng_round_trips_through_a_weights_only_checkpoint(tmp_path) -> None:
    import random

    import numpy as np

    callback = ResumableRNG()
    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    AtomicCheckpointIO().save_checkpoint({"callbacks": {"ResumableRNG": callback.state_dict()}}, tmp_path / "r.ckpt")
    expected = (torch.rand(3), random.random(), np.random.rand())
    state = AtomicCheckpointIO().load_checkpoint(tmp_path / "r.ckpt")["callbacks"]["ResumableRNG"]
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    callback.load_state_dict(state)
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1] and np.random.rand() == expected[2]


def test_train_main_uses_atomic_checkpoints_and_saves_rng(tmp_path, monkeypatch) -> None:
    from vtrans.cli import train_main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["train.py"])
    cli = train_main(["--config", str(REPO / "configs" / "tiny.yaml"), "--trainer.logger", "false"], run=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert sum(isinstance(cb, ResumableRNG) for cb in cli.trainer.callbacks) == 1
    assert sum(isinstance(cb, NonFiniteGuard) for cb in cli.trainer.callbacks) == 1


# --------------------------------------------------------------------------- data order on resume


def test_training_order_depends_on_seed_and_epoch_only() -> None:
    def orders(epochs, seed=0):
        dm = IdiomDataModule(batch_size=16, max_items=64, seed=seed)
        dm.setup("fit")
        sampler = dm.train_dataloader().sampler
        assert isinstance(sampler, EpochShuffle)
        out = {}
        for epoch in epochs:
            sampler.set_epoch(epoch)
            out[epoch] = list(sampler)
        return out

    straight = orders([0, 1, 2])
    resumed = orders([2])  # a fresh DataModule, as after a restart
    assert resumed[2] == straight[2]
    assert straight[0] != straight[1] != straight[2]
    assert sorted(straight[1]) == list(range(64))
    assert orders([1], seed=1)[1] != straight[1]


# --------------------------------------------------------------------------- training subprocesses


def _config(tmp_path: Path, name: str, **trainer) -> tuple[Path, Path]:
    """tiny.yaml with its checkpoints in tmp_path/name and no logger; returns (config, checkpoint dir)."""
    config = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    ckpt_dir = tmp_path / name / "checkpoints"
    config["trainer"].update(logger=False, enable_progress_bar=False, enable_model_summary=False, **trainer)
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("ModelCheckpoint"):
            # every epoch kept, and last.ckpt rewritten every epoch (with a monitor, Lightning
            # rewrites last.ckpt only when the monitored value improves)
            callback["init_args"].update(dirpath=str(ckpt_dir), monitor=None, save_top_k=-1)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, ckpt_dir


def _train(config: Path, *args: str, cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO), env.get("PYTHONPATH", "")])
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), "fit", "--config", str(config), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen, timeout: float = 400) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def _latent(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in checkpoint.read(path)["state_dict"].items() if k.startswith("latent.")}


@pytest.mark.slow
def test_killed_run_resumes_and_matches_an_uninterrupted_run(tmp_path) -> None:
    """SIGKILL in epoch 1; resume from the epoch-0 checkpoint; the final latent equals a straight run's."""
    kill_step = STEPS_PER_EPOCH + 2
    straight_cfg, straight_dir = _config(tmp_path, "straight")
    killed_cfg, killed_dir = _config(tmp_path, "killed")
    straight = _train(straight_cfg, cwd=tmp_path / "straight")
    killed = _train(
        killed_cfg,
        "--trainer.callbacks+=helpers_kill.KillAtStep",
        f"--trainer.callbacks.step={kill_step}",
        cwd=tmp_path / "killed",
    )
    code, err = _finish(killed)
    assert code == -9, f"the run was not killed (exit {code}):\n{err[-3000:]}"
    last = killed_dir / "last.ckpt"
    state = checkpoint.read(last)
    assert (state["epoch"], state["global_step"]) == (0, STEPS_PER_EPOCH)

    resumed = _train(killed_cfg, "--ckpt_path", str(last), cwd=tmp_path / "killed")
    code, err = _finish(resumed)
    assert code == 0, err[-3000:]
    code, err = _finish(straight)
    assert code == 0, err[-3000:]

    final_straight, final_resumed = checkpoint.read(straight_dir / "last.ckpt"), checkpoint.read(last)
    assert final_resumed["global_step"] == final_straight["global_step"] == 3 * STEPS_PER_EPOCH
    for name in ("tiny-epoch=01.ckpt", "tiny-epoch=02.ckpt", "last.ckpt"):
        a, b = _latent(straight_dir / name), _latent(killed_dir / name)
        assert a.keys() == b.keys() and a
        for key in a:
            torch.testing.assert_close(b[key], a[key], atol=0, rtol=0, msg=lambda m, k=f"{name}:{key}": f"{k}: {m}")  # to the bit
    epoch0 = {k: v for k, v in state["state_dict"].items() if k.startswith("latent.")}
    assert any(not torch.allclose(epoch0[k], a[k]) for k in a), "training did not move the latent"


@pytest.mark.slow
@pytest.mark.parametrize("callback", ["NaNAtStep", "NaNActivationsAtStep"])
def test_nan_stops_training_without_writing_nan_checkpoints(tmp_path, callback) -> None:
    nan_step = STEPS_PER_EPOCH + 1
    config, ckpt_dir = _config(tmp_path, "nan")
    proc = _train(
        config,
        f"--trainer.callbacks+=helpers_kill.{callback}",
        f"--trainer.callbacks.step={nan_step}",
        cwd=tmp_path / "nan",
    )
    code, err = _finish(proc)
    assert code == 1, err[-3000:]
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith("error: training stopped: non-finite"), err[-3000:]
    assert f"train step {nan_step}" in last_line
    assert "Traceback" not in err
    files = sorted(ckpt_dir.glob("*.ckpt"))
    assert files, "the epoch-0 checkpoint should have been written before the NaN"
    for path in files:
        saved = checkpoint.read(path)
        assert saved["global_step"] <= STEPS_PER_EPOCH
        assert list(non_finite_tensors(saved["state_dict"])) == [], path
        assert list(non_finite_tensors(saved["optimizer_states"])) == [], path


def test_guard_names_the_step_of_a_non_finite_weight_or_gradient() -> None:
    from types import SimpleNamespace

    module = torch.nn.Linear(2, 2)
    guard, trainer = NonFiniteGuard(), SimpleNamespace(global_step=7)
    guard.on_train_batch_start(trainer, module, None, 0)  # finite: nothing happens
    module.weight.grad = torch.tensor([[0.0, float("inf")], [0.0, 0.0]])
    with pytest.raises(FloatingPointError, match="gradient of weight at train step 7"):
        guard.on_before_optimizer_step(trainer, module, None)
    with torch.no_grad():
        module.bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"non-finite weights \(bias\) at train step 7"):
        guard.on_train_batch_start(trainer, module, None, 0)
    module.bias.requires_grad_(False)  # frozen parameters are not checked
    guard.on_train_batch_start(trainer, module, None, 0)
    assert guard.where() == "train step 7"
