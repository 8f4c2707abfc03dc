"""Interruption, resume, and what happens to bad input during training."""

import csv
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST

from covidseg.core.config import compose_config
from covidseg.core.errors import user_errors
from covidseg.train import train

pytestmark = pytest.mark.slow  # training runs, some in a subprocess
TESTS = Path(__file__).resolve().parent
RESUMABLE = [
    o.replace("{Train: 8, Val: 4, Test: 4}", "{Train:32,Val:4,Test:4}") for o in FAST if not o.startswith("~")
] + [
    "trainer.max_epochs=3",
    "trainer.deterministic=true",
    "callbacks.last_checkpoint.every_n_train_steps=1",
    "~callbacks.progress_bar",
    "~callbacks.model_summary",
    "logger=csv",
    "test=false",
    "data.eval_batch_size=1",  # Val's 4 images in 4 batches: a stop can fall between them
]
EMA = ["callbacks=[default,ema]", "callbacks.ema.decay=0.8"]


def _start(log_dir: Path, *overrides: str, slow: float = 0.0) -> subprocess.Popen:
    env = {**os.environ, "COVIDSEG_CACHE": str(log_dir.parent / "cache"), "PYTHONPATH": str(TESTS)}
    extra = ["+callbacks.slow._target_=helpers.SlowSteps", f"+callbacks.slow.seconds={slow}"] if slow else []
    command = [sys.executable, "-m", "covidseg.train", *RESUMABLE, *extra, f"paths.log_dir={log_dir}", *overrides]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _train_here(log_dir: Path, *overrides: str) -> None:
    """The same run in this process: to start the uninterrupted runs the others are held against,
    and to resume (``ckpt_path=...``) what a stopped process left, without another ~10 s import."""
    run_folder = log_dir / "train" / "runs" / "uninterrupted"  # a resume continues its checkpoint's run folder
    cfg = compose_config(
        "train", [*RESUMABLE, *overrides], log_dir=log_dir, output_dir=run_folder, cache_dir=log_dir.parent / "cache"
    )
    train(cfg)


def _final_metrics(log_dir: Path) -> dict:
    (path,) = log_dir.glob("train/runs/*/metrics.json")
    return json.loads(path.read_text())


def _wait_for_step(log_dir: Path, step: int, process: subprocess.Popen) -> Path:
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        for last in log_dir.glob("train/runs/*/checkpoints/last.ckpt"):
            try:
                if torch.load(last, weights_only=True)["global_step"] >= step:
                    return last
            except (EOFError, RuntimeError, KeyError):
                pass  # being replaced right now
        time.sleep(0.1)
    raise AssertionError(f"no checkpoint at step {step}: {process.communicate()[0][-2000:]}")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    log_dir = tmp_path_factory.mktemp("uninterrupted") / "outputs"
    _train_here(log_dir)
    return _final_metrics(log_dir)


@pytest.fixture(scope="module")
def uninterrupted_with_weight_averaging(tmp_path_factory: pytest.TempPathFactory) -> Path:
    log_dir = tmp_path_factory.mktemp("uninterrupted_ema") / "outputs"
    _train_here(log_dir, *EMA)
    return log_dir


def test_killed_run_resumes_to_the_same_result(
    tmp_path: Path, uninterrupted_with_weight_averaging: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A run killed without warning resumes from its last step's checkpoint and ends where an
    uninterrupted run ends: the trained weights, the averaged weights and their step count come
    back. (A resume without weight averaging: the SIGTERM test below.)"""
    uninterrupted = _final_metrics(uninterrupted_with_weight_averaging)
    log_dir = tmp_path / "outputs"
    process = _start(log_dir, *EMA, slow=0.3)
    _wait_for_step(log_dir, 11, process)  # 8 steps per epoch: in the middle of the second epoch
    process.send_signal(signal.SIGKILL)
    process.wait()
    with caplog.at_level(logging.INFO, logger="covidseg"):
        _train_here(log_dir, *EMA, "ckpt_path=last")
    assert "resuming" in caplog.text
    resumed = _final_metrics(log_dir)
    assert resumed["global_step"] == uninterrupted["global_step"] == 24
    for name in ("val/dice", "val/loss", "val/iou_pooled"):
        assert resumed[name] == pytest.approx(uninterrupted[name], rel=1e-4, abs=1e-6), name


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(tmp_path: Path, uninterrupted: dict) -> None:
    """SIGTERM from outside (a scheduler pre-empting the job, a closed laptop) while a step runs."""
    log_dir = tmp_path / "outputs"
    process = _start(log_dir, "callbacks.last_checkpoint.every_n_train_steps=1000", slow=0.3)
    _wait_for_step(log_dir, 8, process)  # the epoch-end checkpoint of the first epoch
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, output[-2000:]
    assert "Resume with" in output and "ckpt_path=" in output
    (last,) = log_dir.glob("train/runs/*/checkpoints/last.ckpt")
    assert torch.load(last, weights_only=True)["global_step"] > 8
    _train_here(log_dir, f"ckpt_path={last}")
    assert _final_metrics(log_dir)["val/dice"] == pytest.approx(uninterrupted["val/dice"], rel=1e-4, abs=1e-6)


def _stopped_here(log_dir: Path, caplog: pytest.LogCaptureFixture, *overrides: str) -> str:
    """The run in this process, stopped by a signal one of ``overrides``' callbacks sends: the
    exit status of a stopped run, and what Lightning logged (its logger may not propagate)."""
    lightning_log = logging.getLogger("lightning.pytorch")
    lightning_log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO), pytest.raises(SystemExit) as stopped, user_errors():
            _train_here(log_dir, *overrides)
    finally:
        lightning_log.removeHandler(caplog.handler)
    assert stopped.value.code == 128 + signal.SIGTERM
    return caplog.text


def test_ctrl_c_saves_a_checkpoint_and_gives_ctrl_c_back(
    tmp_path: Path, uninterrupted: dict, caplog: pytest.LogCaptureFixture
) -> None:
    """Ctrl-C in the middle of the second epoch; afterwards Ctrl-C does what it did before the run
    (for a notebook or a script that trains in its own process)."""
    log_dir = tmp_path / "outputs"
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN in a job started in the background
    ctrl_c = ["+callbacks.stop._target_=helpers.SignalAfterStep", "+callbacks.stop.signal_name=SIGINT"]
    output = _stopped_here(
        log_dir, caplog, "callbacks.last_checkpoint.every_n_train_steps=1000", *ctrl_c, "+callbacks.stop.step=10"
    )
    assert "Resume with" in output and "ckpt_path=" in output
    assert signal.getsignal(signal.SIGINT) is before
    (last,) = log_dir.glob("train/runs/*/checkpoints/last.ckpt")
    assert torch.load(last, weights_only=True)["global_step"] == 10
    _train_here(log_dir, "ckpt_path=last")
    resumed = _final_metrics(log_dir)
    assert resumed["global_step"] == uninterrupted["global_step"] == 24
    assert resumed["val/dice"] == pytest.approx(uninterrupted["val/dice"], rel=1e-4, abs=1e-6)


def _val_dice_by_epoch(log_dir: Path) -> dict[int, float]:
    """The last process's validation Dice per epoch (Lightning's CSV logger starts its file anew on a resume)."""
    (path,) = log_dir.glob("train/runs/*/**/metrics.csv")
    return {int(row["epoch"]): float(row["val/dice"]) for row in csv.DictReader(path.open()) if row["val/dice"]}


def test_stop_during_validation_resumes_with_that_validation_whole(
    tmp_path: Path, uninterrupted_with_weight_averaging: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A stop while the second epoch validates the weight average: the resume trains on from the
    trained weights (not the average), validates that epoch again over all of Val (not skipped, not
    only the batches the stop left) and ends where an uninterrupted run ends."""
    log_dir = tmp_path / "outputs"
    stop = ["+callbacks.stop._target_=helpers.StopDuringValidation", "+callbacks.stop.epoch=1"]
    assert "Resume with" in _stopped_here(log_dir, caplog, *EMA, *stop)
    _train_here(log_dir, *EMA, "ckpt_path=last")
    expected = _val_dice_by_epoch(uninterrupted_with_weight_averaging)
    assert sorted(expected) == [0, 1, 2]
    assert _val_dice_by_epoch(log_dir) == pytest.approx({1: expected[1], 2: expected[2]}, rel=1e-4, abs=1e-6)
    resumed, uninterrupted = _final_metrics(log_dir), _final_metrics(uninterrupted_with_weight_averaging)
    assert resumed["global_step"] == uninterrupted["global_step"] == 24
    for name in ("val/dice", "val/loss", "val/iou_pooled"):
        assert resumed[name] == pytest.approx(uninterrupted[name], rel=1e-4, abs=1e-6), name


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(compose_cfg) -> None:
    sys.path.insert(0, str(TESTS))
    cfg = compose_cfg(
        "train", [*FAST, "trainer.max_epochs=3", "model.loss._target_=helpers.NaNAfter", "+model.loss.step=5"]
    )
    with pytest.raises(FloatingPointError, match="train loss is nan at global step 2 .*batch starting with"):
        train(cfg)
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True)
    assert state["global_step"] == 2 and all(torch.isfinite(t).all() for t in state["state_dict"].values())


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(compose_cfg, monkeypatch) -> None:
    """The disk fills while the third checkpoint is written: one line, exit code 2, the previous
    ``last.ckpt`` whole and loadable, and no half-written temporary file left beside it."""
    import errno

    from covidseg.core.errors import user_errors

    real_write, writes = Path.write_bytes, []

    def write_until_full(self: Path, data: bytes) -> int:
        if not self.name.endswith(".ckpt"):  # the temporary file beside each checkpoint
            return real_write(self, data)
        writes.append(self)
        if len(writes) <= 2:  # the first epoch's best and last checkpoints
            return real_write(self, data)
        real_write(self, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", write_until_full)
    cfg = compose_cfg("train", [*FAST, "trainer.max_epochs=3"])
    with pytest.raises(SystemExit) as stopped, user_errors():
        train(cfg)
    assert stopped.value.code == 2
    folder = Path(cfg.paths.output_dir) / "checkpoints"
    state = torch.load(folder / "last.ckpt", weights_only=True)
    assert state["global_step"] == 2 and len(writes) == 3
    assert all(Path(target).parent == folder for target in writes)  # written beside, renamed in one step
    assert sorted(path.name for path in folder.iterdir() if path.name.startswith(".")) == []
