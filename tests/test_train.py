import csv
import json
import logging
import os
import pickle
import re
import shutil
import subprocess
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import FAST
from helpers import run_command
from hydra.utils import instantiate

from covidseg.core.config import CONF_DIR
from covidseg.core.errors import ModelFileError
from covidseg.eval import evaluate
from covidseg.eval import main as eval_main
from covidseg.inference.loader import best_checkpoint, check_checkpoint, load_predictor
from covidseg.inference.model_spec import SPEC_KEY
from covidseg.reports.learning_curves import learning_curves, score_by_time
from covidseg.train import main, train
from covidseg.training.build import build_run

ROOT = CONF_DIR.parent
GROUPS = ["data", "model", "trainer", "callbacks", "logger", "debug", "experiment", "hparams_search"]


def _options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("override", [f"{group}={option}" for group in GROUPS for option in _options(group)])
def test_every_config_option_builds_the_whole_run(compose_cfg, override: str) -> None:
    if override == "logger=wandb":
        pytest.importorskip("wandb")  # an optional extra, not in [test]
    gpu_only = ("trainer=gpu", "trainer=ddp", "experiment=best_gpu")
    on_this_machine = ["trainer.accelerator=cpu", "trainer.devices=1"] if override in gpu_only else []
    cfg = compose_cfg("train", [override, *on_this_machine])
    run = build_run(cfg)
    assert run.module.network.net.out_channels == len(cfg.data.targets)
    assert run.datamodule.targets == list(cfg.data.targets)
    callbacks = {type(callback).__name__ for callback in run.trainer.callbacks}
    assert "EmbedModelSpec" in callbacks  # every registered network's checkpoints carry their spec
    assert len(run.trainer.loggers) == len(cfg.get("logger") or {})


def test_eval_config_composes(compose_cfg) -> None:
    cfg = compose_cfg("eval", ["ckpt_path=x.ckpt", "data.split=val"])
    assert instantiate(cfg.data).split == "Val"


@pytest.mark.slow
@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_trains_one_batch(compose_cfg, experiment: str) -> None:
    # best_gpu, on this machine's CPU: its loader workers and pinned memory are for a GPU's host
    on_cpu = ["trainer.accelerator=cpu", "data.num_workers=0", "data.pin_memory=false"] * (experiment == "best_gpu")
    cfg = compose_cfg("train", [f"experiment={experiment}", *FAST, "debug=fast_dev_run", *on_cpu])
    metrics, _ = train(cfg)
    assert "val/dice" in metrics and "test/dice" in metrics


def test_bf16_only_where_the_cpu_has_native_bf16(monkeypatch) -> None:
    from covidseg.core import hardware

    for flags, expected in (
        ({"avx2", "avx512_bf16"}, "bf16-mixed"),
        ({"amx_bf16"}, "bf16-mixed"),
        ({"avx2"}, "32-true"),
    ):
        monkeypatch.setattr(hardware, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert hardware.cpu_precision.__wrapped__() == expected


@pytest.mark.slow
def test_bf16_training_keeps_loss_and_metrics_in_fp32(compose_cfg) -> None:
    from covidseg.core.hardware import cpu_precision

    cfg = compose_cfg("train", [*FAST, "trainer.precision=bf16-mixed", "test=false", "logger=csv"])
    metrics, _ = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["val/loss"])) and 0 <= metrics["val/dice"] <= 1
    last = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(tensor.dtype != torch.bfloat16 for tensor in last["state_dict"].values())  # weights stay fp32
    assert compose_cfg("train", ["experiment=fast_cpu"]).trainer.precision == cpu_precision()
    assert compose_cfg("train", ["experiment=best_cpu"]).trainer.precision == cpu_precision()
    assert compose_cfg("train", ["experiment=lung_infection"]).trainer.precision == "32-true"


@pytest.mark.slow
def test_train_then_eval_round_trip(compose_cfg, tmp_path: Path) -> None:
    cfg = compose_cfg("train", [*FAST, "trainer.max_epochs=2"])
    metrics, objective = train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    checkpoints = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    assert {p.name for p in checkpoints} >= {"last.ckpt"} and len(checkpoints) == 2
    best = next(p for p in checkpoints if p.name != "last.ckpt")
    assert objective == pytest.approx(float(best.stem.split("dice")[-1]), abs=1e-4)
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["torch"] == torch.__version__ and info["command"]

    checkpoint, spec = check_checkpoint(best)
    assert checkpoint[SPEC_KEY]["networks"][0]["options"]["base_width"] == spec.networks[0].options["base_width"] == 4

    same_data = [o for o in FAST if o.startswith("data") and not o.startswith("data.image_size")]
    eval_cfg = compose_cfg("eval", [f"ckpt_path={best}", *same_data, "data.split=Test"])
    # image size and network come from the checkpoint, not from eval's defaults
    eval_metrics = evaluate(eval_cfg)
    assert eval_metrics["test/dice"] == pytest.approx(metrics["test/dice"], abs=1e-5)
    eval_dir = Path(eval_cfg.paths.output_dir)
    assert json.loads((eval_dir / "metrics.json").read_text())["test/dice"] == pytest.approx(eval_metrics["test/dice"])
    with (eval_dir / "per_image.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and rows[0]["file"].startswith("Test/COVID-19/")
    mean_dice = sum(float(row["dice_infection"]) for row in rows) / len(rows)
    assert mean_dice == pytest.approx(eval_metrics["test/dice"], abs=1e-4)
    report = (eval_dir / "report.html").read_text()
    assert report.count("data:image/png;base64,") == 4  # histogram + three galleries
    assert {p.name for p in (eval_dir / "gallery").iterdir()} == {"best.png", "median.png", "worst.png"}


def test_weight_averaging_validates_saves_and_ships_the_averaged_weights(compose_cfg) -> None:
    cfg = compose_cfg("train", [*FAST, "trainer.max_epochs=2", "callbacks=[default,ema]", "callbacks.ema.decay=0.5"])
    train(cfg)
    best = best_checkpoint(Path(cfg.paths.output_dir))
    checkpoint, _ = check_checkpoint(best)
    averaged, trained = checkpoint["state_dict"], checkpoint["current_model_state"]
    assert any(not torch.equal(averaged[name], trained[name]) for name in averaged)
    network = load_predictor(best, cfg.paths.log_dir).predictor.networks[0]
    for name, tensor in network.state_dict().items():
        assert torch.equal(tensor, averaged[f"network.{name}"]), name

    same_data = [o for o in FAST if o.startswith("data") and not o.startswith("data.image_size")]
    val = evaluate(compose_cfg("eval", [f"ckpt_path={best}", *same_data, "data.split=Val"]))
    assert val["test/dice"] == pytest.approx(float(best.stem.split("dice")[-1]), abs=1e-4)  # what was validated


def test_a_time_limit_that_cuts_the_schedule_short_is_announced_and_the_run_finishes_on_resume(
    compose_cfg, caplog, tmp_path: Path
) -> None:
    def train_logged(overrides: list[str]) -> tuple[dict[str, float], list[str]]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="covidseg.training.callbacks.time_budget"):
            metrics, _ = train(compose_cfg("train", [*FAST, "test=false", "trainer.max_epochs=4", *overrides]))
        return metrics, [
            record.getMessage() for record in caplog.records if record.name == "covidseg.training.callbacks.time_budget"
        ]

    straight, warnings = train_logged(["trainer.max_time=00:01:00:00", f"paths.output_dir={tmp_path / 'straight'}"])
    assert warnings == []
    # no time at all: min_epochs=1 lets the first epoch finish, then the limit stops the run at its end
    _, (foreseen, stopped) = train_logged(["trainer.max_time=00:00:00:00"])
    assert "precision 32-true), 4 epochs take about" in foreseen and "training will stop after epoch 1," in foreseen
    done = re.match(r"trainer\.max_time stopped training after (\d\.\d) of 4 epochs", stopped)
    assert done is not None and done.group(1) == "1.0" and "to finish it: python" in stopped, stopped
    suggested = re.search(r"trainer\.max_time=(\S+) ckpt_path=last$", stopped)
    assert suggested is not None, stopped

    last = tmp_path / "outputs" / "run" / "checkpoints" / "last.ckpt"
    resumed, warnings = train_logged([f"trainer.max_time={suggested.group(1)}", f"ckpt_path={last}"])
    assert warnings == []
    assert resumed["global_step"] == straight["global_step"]
    assert resumed["val/loss"] == pytest.approx(straight["val/loss"], abs=1e-6)


def _clocked_trainer(limit: float) -> tuple:
    """A :class:`~covidseg.training.callbacks.TimeBudget`, Lightning's Timer with a hand-moved clock (``timer.now``)
    and the little of a Trainer they read: 22 epochs of 100 batches."""
    from lightning.pytorch.callbacks import Timer

    from covidseg.training.callbacks import TimeBudget

    class Clock(Timer):
        now = 0.0

        def time_elapsed(self, stage: str = "train") -> float:
            return self.now

        def time_remaining(self, stage: str = "train") -> float:
            return limit - self.now

    timer = Clock(duration=timedelta(seconds=limit))
    trainer = SimpleNamespace(
        max_epochs=22, callbacks=[timer], is_global_zero=True, precision="32-true", should_stop=False,
        strategy=SimpleNamespace(broadcast=lambda decision: decision),
        fit_loop=SimpleNamespace(min_epochs=None, epoch_loop=SimpleNamespace(batch_progress=None)),
        num_training_batches=100,
    )  # fmt: skip
    return TimeBudget(), timer, trainer


@pytest.mark.parametrize("limit", [1000.0, 1040.0])
def test_the_time_limit_stops_at_an_epoch_end_and_the_forecast_repeats_only_when_a_quarter_longer(
    caplog, limit: float
) -> None:
    budget, timer, trainer = _clocked_trainer(limit)
    warnings = []
    # progressive resizing: four 60 s epochs at 96², then 110 s epochs at 128²; the 11th is slower (160 s)
    for epoch, seconds in enumerate([60, 60, 60, 60, 110, 112, 112, 112, 112, 112, 160]):
        if trainer.should_stop:
            break
        trainer.current_epoch = epoch
        budget.on_train_epoch_start(trainer, None)
        timer.now = min(timer.now + seconds, limit)  # the Timer cuts an epoch at the limit
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="covidseg.training.callbacks.time_budget"):
            budget.on_train_epoch_end(trainer, None)
        warnings += [(epoch + 1, record.getMessage()) for record in caplog.records]
    assert [epoch for epoch, _ in warnings] == [1, 5]
    assert "at 0:01:00 per epoch (precision 32-true), 22 epochs take about 0:22:00" in warnings[0][1]
    first_stop = 16 if limit == 1000 else 17
    assert f"is {timedelta(seconds=limit)}: training will stop after epoch {first_stop}," in warnings[0][1]
    assert "restart with trainer.max_time=00:00:25:00" in warnings[0][1]  # 22 min + 10 %, whole minutes
    assert "at 0:01:50 per epoch" in warnings[1][1] and "22 epochs take about 0:37:00" in warnings[1][1]
    assert f"stop after epoch {10 if limit == 1000 else 11}," in warnings[1][1]

    batches = 1000 if limit == 1000 else 1081  # 10 epochs of 100 batches, or 81 % of the 11th as well
    trainer.fit_loop.epoch_loop.batch_progress = SimpleNamespace(total=SimpleNamespace(completed=batches))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="covidseg.training.callbacks.time_budget"):
        budget.on_train_end(trainer, None)
    (stopped,) = [record.getMessage() for record in caplog.records]
    if limit == 1000:  # 910 s after 10 epochs, 90 s left: the 11th (112 s) would not fit, so it stops now
        assert trainer.should_stop and timer.now == 910
        assert stopped.startswith(
            "trainer.max_time stopped training after 10.0 of 22 epochs (0:15:10), at the end of epoch 10: "
            "the next would not have finished in time;"
        )
        assert "to finish it: python -m covidseg.train" in stopped
        assert stopped.endswith("trainer.max_time=00:00:42:00 ckpt_path=last")  # (910 s + 12 × 112 s) + 10 %
    else:  # 130 s left fit a 112 s epoch, but the 11th took longer: the Timer cut it, which sets no pace
        assert not trainer.should_stop and timer.now == 1040
        assert stopped.startswith("trainer.max_time stopped training after 10.8 of 22 epochs (0:17:20), mid-epoch;")
        assert "to finish it (from epoch 12: the rest of the cut one is skipped): python -m covidseg.train" in stopped
        assert stopped.endswith("trainer.max_time=00:00:43:00 ckpt_path=last")  # (1040 s + 11.19 × 112 s) + 10 %


def test_an_epoch_resumed_midway_sets_no_pace(caplog) -> None:
    """Resumed in the middle of an epoch, Lightning calls no ``on_train_epoch_start`` for its rest:
    that epoch's length is unknown, so it neither stops the run nor sets the pace; the next does."""
    budget, timer, trainer = _clocked_trainer(4000.0)
    timer.now = 3000.0  # the interrupted process's time, restored with the Timer's state
    trainer.current_epoch = 15
    with caplog.at_level(logging.WARNING, logger="covidseg.training.callbacks.time_budget"):
        timer.now += 60  # the rest of the 16th epoch
        budget.on_train_epoch_end(trainer, None)
        assert not trainer.should_stop and caplog.records == []
        trainer.current_epoch = 16
        budget.on_train_epoch_start(trainer, None)
        timer.now += 200  # 3260 s: 5 epochs of 200 s left, 740 s to the limit
        budget.on_train_epoch_end(trainer, None)
    (forecast,) = [record.getMessage() for record in caplog.records]
    assert "at 0:03:20 per epoch" in forecast and "22 epochs take about 1:11:00" in forecast
    assert "training will stop after epoch 20," in forecast and not trainer.should_stop


@pytest.mark.slow
def test_tensorboard_gets_charts_and_learning_curves_render(compose_cfg) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = compose_cfg("train", [*FAST, "trainer.max_epochs=2", "test=false"])
    train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = events.Tags()
    assert {"val/dice", "val/iou", "val/dice_pooled", "train/loss_epoch"} <= set(tags["scalars"])
    assert "val/per_image_dice" in tags["histograms"] and "val/examples" in tags["images"]
    assert any("pr_curve" in tag for tag in tags["tensors"])
    assert learning_curves(run_dir).stat().st_size > 10_000
    with score_by_time(run_dir).open() as handle:
        rows = list(csv.DictReader(handle))
    assert [float(row["val/dice"]) for row in rows] == pytest.approx(
        [p.value for p in events.Scalars("val/dice")], abs=1e-4
    )
    minutes = [float(row["minutes"]) for row in rows]
    assert 0 <= minutes[0] <= minutes[1] < 5


@pytest.mark.slow
def test_same_seed_gives_identical_metrics(compose_cfg) -> None:
    fast = [o for o in FAST if not o.startswith("~callbacks")]
    overrides = [*fast, "trainer.deterministic=true", "logger=csv", "callbacks=none"]
    first, _ = train(compose_cfg("train", overrides))
    second, _ = train(compose_cfg("train", overrides))
    assert first == second


def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"state_dict": {}, "payload": Exploit()}))
    with pytest.raises(ModelFileError, match="without unpickling objects"):
        load_predictor(str(path), tmp_path)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.slow
def test_checkpoint_whose_spec_does_not_fit_or_is_missing_is_refused(trained_checkpoints, tmp_path: Path) -> None:
    checkpoint = torch.load(trained_checkpoints[0], weights_only=True)
    checkpoint[SPEC_KEY]["networks"][0]["options"]["base_width"] = 8
    torch.save(checkpoint, tmp_path / "wider.ckpt")
    with pytest.raises(ModelFileError, match="the weights do not fit its model spec"):
        load_predictor(str(tmp_path / "wider.ckpt"), tmp_path)
    del checkpoint[SPEC_KEY]
    torch.save(checkpoint, tmp_path / "bare.ckpt")
    with pytest.raises(ModelFileError, match="key 'covidseg_model' is missing"):
        load_predictor(str(tmp_path / "bare.ckpt"), tmp_path)


@pytest.mark.slow
def test_multirun_sweeps_two_jobs(tmp_path: Path, cache_dir: Path) -> None:
    overrides = [o.replace("{Train: 8, Val: 4, Test: 4}", "{Train:8,Val:4,Test:4}") for o in FAST]
    swept = ["model.optimizer.lr=1e-3,3e-4", "test=false", f"paths.cache_dir={cache_dir}"]
    assert run_command(main, "-m", *overrides, *swept, f"paths.log_dir={tmp_path / 'outputs'}") == 0
    jobs = sorted((tmp_path / "outputs/train/multiruns").glob("*/[0-9]"))
    assert [job.name for job in jobs] == ["0", "1"]
    assert all((job / "checkpoints/last.ckpt").is_file() for job in jobs)


def test_a_multirun_never_resumes_one_checkpoint_in_every_job(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert run_command(main, "-m", "data=synthetic", "seed=1,2", "ckpt_path=last", f"paths.log_dir={tmp_path}") == 2
    assert "would make every job resume the same checkpoint" in capsys.readouterr().err


def test_debug_runs_have_their_own_task(compose_cfg) -> None:
    for debug in ("fast_dev_run", "limit", "overfit"):
        assert compose_cfg("train", [f"debug={debug}", "experiment=fast_cpu"]).task_name == "debug"


@pytest.mark.slow
def test_installed_commands_take_hydra_overrides(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    commands = ("train", "eval", "calibrate", "distill", "predict", "export", "serve")
    for command in (f"covidseg-{name}" for name in commands):
        assert shutil.which(command), f"{command} is not installed: pip install -e ."
    refused = subprocess.run(
        ["covidseg-eval", "ckpt_path=nope.ckpt"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert refused.returncode == 2 and "error: ckpt_path 'nope.ckpt' does not exist" in refused.stderr
    assert run_command(main, "--help") == 0 and "experiment: best_cpu, best_gpu, fast_cpu" in capsys.readouterr().out


def test_user_errors_exit_cleanly_with_the_key_named(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert run_command(main, f"data.root={tmp_path / 'missing'}", f"paths.log_dir={tmp_path}") == 2
    error = capsys.readouterr().err
    assert "data.root" in error and "missing" in error and "Traceback" not in error
    assert run_command(main, "model=nope", "trainer.max_epoch=3", f"paths.log_dir={tmp_path}") == 2
    error = capsys.readouterr().err.strip()  # Hydra's own message, on one line
    assert error.startswith("error: In 'train': Could not find 'model/nope'") and len(error.splitlines()) == 1
    # a model file whose spec would make Hydra write a file: one line, exit 2, nothing written
    payload = {"_target_": "pathlib.Path.write_text", "self": str(tmp_path / "pwned"), "data": "pwned"}
    torch.save({"state_dict": {}, SPEC_KEY: {"networks": [payload]}}, tmp_path / "crafted.ckpt")
    assert run_command(eval_main, "ckpt_path=crafted.ckpt", f"paths.log_dir={tmp_path}") == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error and not (tmp_path / "pwned").exists()
    assert error.strip().splitlines()[-1].startswith("error: 'crafted.ckpt': key 'covidseg_model.networks.0._target_'")
