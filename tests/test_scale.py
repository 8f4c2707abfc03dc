"""k-fold cross-validation (and, below, distributed training and sweeps)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAST
from helpers import run_command

from covidseg.core.errors import DataError
from covidseg.data import CovidQuExDataModule, SyntheticPhantoms
from covidseg.reports.kfold_summary import summarise


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    counts = {"Train": 10, "Val": 5, "Test": 4}
    return SyntheticPhantoms(counts, image_size=32, seed=2).write(tmp_path_factory.mktemp("folds") / "data")


def _names(root: Path, fold: int, train: bool, seed: int = 0) -> set[str]:
    datamodule = CovidQuExDataModule(
        root, classes=["COVID-19", "Normal"], image_size=32, num_folds=3, fold=fold, seed=seed
    )
    return set(datamodule.dataset("Val" if not train else "Train", train=train).names)


def test_folds_partition_train_and_val_stratified_and_reproducibly(root: Path) -> None:
    validation = [_names(root, fold, train=False) for fold in range(3)]
    everything = set.union(*validation)
    assert len(everything) == 2 * 15 and sum(len(v) for v in validation) == 30  # disjoint, complete
    for fold, held_out in enumerate(validation):
        assert _names(root, fold, train=True) == everything - held_out
        assert sum("/COVID-19/" in name for name in held_out) == 5  # 15 per class / 3 folds
    assert validation[0] == _names(root, 0, train=False)
    assert validation[0] != _names(root, 0, train=False, seed=1)
    test_names = set(
        CovidQuExDataModule(root, classes=["COVID-19", "Normal"], image_size=32, num_folds=3).dataset("Test").names
    )
    assert not test_names & everything and len(test_names) == 8


def test_bad_fold_settings_name_the_keys(root: Path) -> None:
    with pytest.raises(DataError, match="data.num_folds=3 and data.fold=3"):
        CovidQuExDataModule(root, num_folds=3, fold=3)


@pytest.mark.slow
def test_three_fold_multirun_summary_and_its_folds_as_an_ensemble(tmp_path: Path, compose_cfg, cache_dir: Path) -> None:
    from covidseg import kfold_summary
    from covidseg.train import main

    overrides = [o.replace("{Train: 8, Val: 4, Test: 4}", "{Train:8,Val:4,Test:4}") for o in FAST]
    folds = ["data.num_folds=3", "data.fold=0,1,2", "logger=csv", f"paths.cache_dir={cache_dir}"]
    assert run_command(main, "-m", *overrides, *folds, f"paths.log_dir={tmp_path / 'outputs'}") == 0
    (multirun,) = (tmp_path / "outputs/train/multiruns").iterdir()
    assert run_command(kfold_summary.main, str(multirun)) == 0
    summary = json.loads((multirun / "kfold_summary.json").read_text())
    assert summary["val/dice"]["n"] == 3 and "test/dice" in summary
    folds = [json.loads((multirun / str(job) / "metrics.json").read_text())["val/dice"] for job in range(3)]
    assert summary["val/dice"]["mean"] == pytest.approx(sum(folds) / 3)
    assert summary == summarise(multirun)

    from covidseg.eval import evaluate
    from covidseg.inference.loader import best_checkpoint, load_predictor

    folds = [best_checkpoint(multirun / str(job)) for job in range(3)]
    ensemble = load_predictor(str(multirun), tmp_path)
    assert ensemble.paths == folds and len(ensemble.predictor.networks) == 3
    data = [o for o in overrides if o.startswith("data")]
    as_folder = evaluate(compose_cfg("eval", [f"ckpt_path={multirun}", *data]))
    as_list = evaluate(compose_cfg("eval", [f"ckpt_path=[{','.join(map(str, folds))}]", *data]))
    assert as_folder == as_list and 0 <= as_folder["test/dice"] <= 1


@pytest.mark.slow
def test_ddp_on_cpu_gives_the_single_process_metrics(tmp_path: Path, compose_cfg) -> None:
    from covidseg.eval import evaluate

    overrides = [o.replace("{Train: 8, Val: 4, Test: 4}", "{Train:8,Val:6,Test:6}") for o in FAST]
    env = {**os.environ, "COVIDSEG_CACHE": str(tmp_path / "cache")}
    log_dir = tmp_path / "ddp"
    command = [sys.executable, "-m", "covidseg.train", *overrides, "trainer=ddp_cpu", "logger=csv",
               "data.eval_batch_size=2", f"paths.log_dir={log_dir}"]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (log_dir / "train/runs").iterdir()  # one run folder for both processes
    ddp_metrics = json.loads((run_dir / "metrics.json").read_text())
    best = next(p for p in (run_dir / "checkpoints").glob("*.ckpt") if p.name != "last.ckpt")

    data = [o for o in overrides if o.startswith("data") and not o.startswith("data.image_size")]
    single = evaluate(compose_cfg("eval", [f"ckpt_path={best}", *data]))
    for name in ("test/dice", "test/iou", "test/dice_pooled", "test/iou_pooled"):
        assert ddp_metrics[name] == pytest.approx(single[name], abs=1e-5), name


@pytest.mark.slow
def test_optuna_sweep_runs_two_trials(tmp_path: Path, cache_dir: Path) -> None:
    from omegaconf import OmegaConf

    from covidseg.train import main

    overrides = [o.replace("{Train: 8, Val: 4, Test: 4}", "{Train:8,Val:4,Test:4}") for o in FAST]
    overrides = [o for o in overrides if not o.startswith("model.net.base_width")]  # swept
    sweep = ["hparams_search=optuna", "hydra.sweeper.n_trials=2", "logger=csv", "test=false"]
    paths = [f"paths.cache_dir={cache_dir}", f"paths.log_dir={tmp_path / 'outputs'}"]
    assert run_command(main, *sweep, *overrides, *paths) == 0
    (multirun,) = (tmp_path / "outputs/train/multiruns").iterdir()
    assert sorted(p.name for p in multirun.iterdir() if p.name.isdigit()) == ["0", "1"]
    best = OmegaConf.load(multirun / "optimization_results.yaml")
    trials = [json.loads((multirun / job / "metrics.json").read_text())["val/dice"] for job in ("0", "1")]
    assert best.best_value == pytest.approx(max(trials)) and "model.net.base_width" in best.best_params


def test_slurm_launcher_config_composes() -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from covidseg.core.config import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose(
            "train",
            overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "trainer=gpu"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.timeout_min) == ("gpu", 1, 240)
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
