"""Experiment trackers: MLflow's local store read back through its own client; tags everywhere."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import FAST

from covidseg.train import train
from covidseg.training.build import instantiate_each


@pytest.mark.slow
def test_a_tiny_run_logged_to_mlflow_reads_back(compose_cfg, tmp_path: Path) -> None:
    mlflow = pytest.importorskip("mlflow")
    cfg = compose_cfg(
        "train",
        [
            *FAST,
            "logger=many",
            "tags=[smoke,tiny]",
            "test=false",
            "trainer.max_epochs=2",
            "trainer.log_every_n_steps=1",
        ],
    )
    train(cfg)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("train")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["smoke"] == "true" and run.data.tags["tiny"] == "true"
    assert run.data.params["model/optimizer/lr"] == str(cfg.model.optimizer.lr)
    assert run.data.params["tags"] == "['smoke', 'tiny']"
    history = client.get_metric_history(run.info.run_id, "val/dice")
    assert len(history) == 2 and all(0 <= point.value <= 1 for point in history)
    assert len(client.get_metric_history(run.info.run_id, "train/loss_step")) >= 2  # per step
    artifacts = {item.path for item in client.list_artifacts(run.info.run_id)}
    assert "config" in artifacts
    (checkpoint,) = [item.path for item in client.list_artifacts(run.info.run_id, "checkpoints")]
    assert checkpoint.startswith("checkpoints/epoch") and "-dice" in checkpoint
    assert (tmp_path / "outputs" / "run" / "csv" / "metrics.csv").is_file()  # many = TensorBoard + CSV + MLflow


def test_tags_reach_every_logger_config(compose_cfg, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = compose_cfg("train", ["logger=many", "tags=[a]"])
    assert cfg.logger.mlflow.tags == {"a": "true"}
    assert sorted(cfg.logger) == ["csv", "mlflow", "tensorboard"]
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc from `wandb login`
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    wandb = compose_cfg("train", ["logger=wandb", "tags=[a]"]).logger.wandb
    assert list(wandb.tags) == ["a"] and wandb.offline is True
    monkeypatch.setenv("WANDB_API_KEY", "key")
    assert compose_cfg("train", ["logger=wandb"]).logger.wandb.offline is False


def test_wandb_runs_offline_without_a_login(compose_cfg, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = compose_cfg("train", ["logger=wandb"])
    assert cfg.logger.wandb.offline is True
    (logger,) = instantiate_each(cfg.logger)
    assert logger._offline
