"""What a hostile or unlucky user does that earlier tests did not: folders of theirs named as run or
output folders, runs started at once, a disk that fills mid-write, run folders edited by hand,
k-fold folders with a fold missing, and files that break the readers in new ways."""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import dicom_bytes, png_bytes, run_command

from covidseg.core.errors import DataError, ModelFileError, user_errors
from covidseg.core.writing import NEW_FILE_MODE, RUN_MARKER, exclusive_lock, new_run_folder, write_atomic
from tests.conftest import FAST

USERS_FILES = {"metrics.json": '{"mine": 1}', "per_image.csv": "mine\n", "report.html": "<p>mine</p>",
               "run_info.json": "{}", "teacher_targets.npz": "mine"}  # fmt: skip


def checksums(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def users_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "mine"
    folder.mkdir()
    for name, text in USERS_FILES.items():
        (folder / name).write_text(text)
    return folder


def xray_folder(tmp_path: Path, *names: str) -> Path:
    """A folder of 64x64 noise images under those names (predict reads them; the model's answer
    does not matter here)."""
    inputs = tmp_path / "xrays"
    inputs.mkdir()
    for name in names:
        (inputs / name).write_bytes(png_bytes(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)))
    return inputs


# --- one rule for "is this folder mine to write" -----------------------------------------------------


@pytest.mark.parametrize("command", ["eval", "distill", "train", "calibrate", "export", "predict"])
def test_a_folder_of_the_users_named_as_the_run_folder_is_refused_untouched(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import importlib

    folder = users_folder(tmp_path)
    before = checksums(folder)
    own = {
        "eval": ["ckpt_path=pretrained", *FAST[:5]],
        "distill": ["ckpt_path=pretrained", *FAST[:5]],
        "train": FAST[:5],
        "calibrate": ["ckpt_path=pretrained", *FAST[:5]],
        "export": ["ckpt_path=pretrained", "format=onnx", f"output={tmp_path / 'export'}"],
        "predict": ["ckpt_path=pretrained", f"input={tmp_path / 'mine'}", f"output={tmp_path / 'out'}"],
    }[command]
    main = importlib.import_module(f"covidseg.{command}").main
    paths = [f"paths.log_dir={tmp_path / 'outputs'}", f"paths.cache_dir={tmp_path / 'cache'}"]
    assert run_command(main, *own, *paths, f"hydra.run.dir={folder}") == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: hydra.run.dir") and "already holds files" in error and len(error.splitlines()) == 1
    assert checksums(folder) == before and sorted(p.name for p in folder.iterdir()) == sorted(USERS_FILES)


def test_runs_that_claim_one_folder_at_once_each_get_their_own(tmp_path: Path) -> None:
    """Four processes claim the same time-stamped name at once: four folders, each claimed once."""
    wanted = tmp_path / "runs" / "2026-12-05_16-00-00"
    with multiprocessing.get_context("fork").Pool(4) as pool:
        folders = pool.starmap(new_run_folder, [(wanted, False)] * 4)
    assert len(set(folders)) == 4 and str(wanted) in map(str, folders)
    assert all((folder / RUN_MARKER).is_file() and len(os.listdir(folder)) == 1 for folder in folders)
    with pytest.raises(DataError, match="already holds files"):  # a name the user gave is not renamed
        new_run_folder(wanted, chosen_by_user=True)
    assert new_run_folder(tmp_path / "empty-of-mine", chosen_by_user=True).is_dir()  # new: fine


def test_a_path_through_a_missing_folder_to_the_users_folder_is_seen_for_what_it_is(
    tmp_path: Path, trained_checkpoints: list[Path], capsys: pytest.CaptureFixture
) -> None:
    """``output=<missing>/../<yours>`` is ``output=<yours>``: refused like it, nothing overwritten."""
    from covidseg.export import main as export_main
    from covidseg.predict import main as predict_main

    inputs = xray_folder(tmp_path, "a.png")
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "predictions.csv").write_text("mine\n")
    (folder / "model.json").write_text("mine\n")
    before = checksums(folder)
    sideways = f"{tmp_path / 'nothing-here'}/../results"
    common = [f"ckpt_path={trained_checkpoints[0]}", f"hydra.run.dir={tmp_path / 'runs' / 'x'}"]
    assert run_command(predict_main, *common, f"input={inputs}", f"output={sideways}") == 2
    assert "which predict did not write" in capsys.readouterr().err
    common[1] = f"hydra.run.dir={tmp_path / 'runs' / 'y'}"
    assert run_command(export_main, *common, "format=onnx", f"output={sideways}") == 2
    assert "already holds model.json" in capsys.readouterr().err
    assert checksums(folder) == before and not (tmp_path / "nothing-here").exists()


def test_a_predict_output_in_use_by_another_predict_is_refused_in_one_line(
    tmp_path: Path, trained_checkpoints: list[Path], capsys: pytest.CaptureFixture
) -> None:
    from covidseg.predict import main

    inputs = xray_folder(tmp_path, "a.png")
    output = tmp_path / "out"
    output.mkdir()
    arguments = [f"ckpt_path={trained_checkpoints[0]}", f"input={inputs}", f"output={output}"]
    with exclusive_lock(output) as locked:  # as a predict writing there holds it
        assert locked
        assert run_command(main, *arguments, f"hydra.run.dir={tmp_path / 'r1'}") == 2
    assert "is being written by another covidseg command" in capsys.readouterr().err
    assert not (output / "predictions.csv").exists()
    assert run_command(main, *arguments, f"hydra.run.dir={tmp_path / 'r2'}") == 0  # free again
    mode = stat.S_IMODE((output / "a.png.mask.png").stat().st_mode)
    assert mode == NEW_FILE_MODE  # the umask's permissions, as every other output (not mkstemp's 0600)


# --- a full disk never leaves a truncated file ----------------------------------------------------------


def test_a_write_that_fails_midway_leaves_the_previous_file_and_no_temporary(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "metrics.json"
    target.write_text("previous\n")
    real = Path.write_bytes

    def half_then_full(self: Path, data: bytes) -> int:
        real(self, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", half_then_full)
    with pytest.raises(OSError, match="No space left"):
        write_atomic(target, "new and much longer content\n" * 100)
    monkeypatch.undo()
    assert target.read_text() == "previous\n" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    write_atomic(target, "new\n")
    assert target.read_text() == "new\n" and stat.S_IMODE(target.stat().st_mode) == NEW_FILE_MODE


def test_an_export_that_fails_leaves_none_of_its_files_and_the_next_one_works(
    tmp_path: Path, trained_checkpoints: list[Path], monkeypatch, capsys: pytest.CaptureFixture
) -> None:
    from covidseg.export import main
    from covidseg.inference import exporters

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    output = tmp_path / "exported"
    arguments = [f"ckpt_path={trained_checkpoints[0]}", "format=safetensors", f"output={output}"]
    monkeypatch.setattr(exporters, "write_metadata", disk_full)  # after model.safetensors and .yaml are written
    assert run_command(main, *arguments, f"hydra.run.dir={tmp_path / 'r1'}") == 2
    assert "No space left on device" in capsys.readouterr().err
    assert sorted(p.name for p in output.iterdir()) == []  # no model file without its spec and metadata
    monkeypatch.undo()
    assert run_command(main, *arguments, f"hydra.run.dir={tmp_path / 'r2'}") == 0
    assert sorted(p.name for p in output.iterdir()) == [
        "MODEL_CARD.md",
        "model.json",
        "model.safetensors",
        "model.yaml",
    ]


# --- files read back from a run folder are untrusted -----------------------------------------------------

LAUGHS = "\n".join(
    ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    + ["data: *a8"]
)


@pytest.mark.parametrize(
    ("recorded", "message"),
    [
        (LAUGHS, "anchors and aliases are not allowed"),
        ("[" * 100_000, "is not valid YAML"),
        ("!!python/object/apply:os.system ['touch pwned']", "is not valid YAML"),
        ("- just\n- a list\n", "holds a list, expected a run's recorded config"),
        ("#" * 2_000_000, "bytes; a run's recorded config is under"),
        (None, "is missing, so the settings of this resume cannot be checked"),
    ],
    ids=["billion laughs", "deep brackets", "python tag", "a list", "too large", "deleted"],
)
def test_a_hand_edited_recorded_config_stops_a_resume_in_one_line(
    recorded: str | None, message: str, compose_cfg, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from covidseg.train import train

    cfg = compose_cfg("train", [*FAST, "test=false", "logger=csv"])
    train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    (run_dir / ".hydra").mkdir(exist_ok=True)
    if recorded is None:
        (run_dir / ".hydra" / "config.yaml").unlink(missing_ok=True)
    else:
        (run_dir / ".hydra" / "config.yaml").write_text(recorded)
    before = checksums(run_dir)
    resume = compose_cfg("train", [*FAST, "test=false", "logger=csv", f"ckpt_path={run_dir / 'checkpoints/last.ckpt'}"])
    with pytest.raises(SystemExit) as stopped, user_errors():
        train(resume)
    error = capsys.readouterr().err.strip()
    assert stopped.value.code == 2 and len(error.splitlines()) == 1 and message in error, error
    assert checksums(run_dir) == before and not Path("pwned").exists()


def test_a_damaged_cache_record_is_rebuilt_not_a_traceback(tmp_path: Path, cache_dir: Path, caplog) -> None:
    from covidseg.data.decode import decode_samples
    from covidseg.data.index import index_split
    from covidseg.data.synthetic import SyntheticPhantoms

    root = SyntheticPhantoms({"Train": 2}, classes=["COVID-19"], image_size=64).write(tmp_path / "data")
    samples = index_split(root, "Train")
    cache = tmp_path / "cache"
    images, masks = decode_samples(samples, 64, cache)
    (record,) = cache.glob("*.json")
    record.write_text("[" * 100_000)
    again, _ = decode_samples(samples, 64, cache)
    assert np.array_equal(again, images) and "is damaged" in caplog.text
    assert not list(cache.glob(".*"))  # no temporary file left beside the entries


# --- settings and folders checked against what exists ------------------------------------------------------


def _multirun_of_folds(tmp_path: Path, checkpoint: Path, finished: tuple[int, ...]) -> Path:
    """A k-fold multirun folder of three folds, as ``train -m`` leaves it, with only ``finished`` done."""
    multirun = tmp_path / "multirun"
    for fold in range(3):
        job = multirun / str(fold)
        (job / "checkpoints").mkdir(parents=True)
        (job / ".hydra").mkdir()
        (job / ".hydra" / "config.yaml").write_text(f"data:\n  num_folds: 3\n  fold: {fold}\n")
        shutil.copy(checkpoint, job / "checkpoints" / f"epoch000-dice0.{fold + 1}000.ckpt")
        if fold in finished:
            (job / "metrics.json").write_text('{"val/dice": 0.5, "test/dice": 0.4}')
    (multirun / "multirun.yaml").write_text("hydra: {}\n")
    return multirun


def test_a_k_fold_folder_with_a_fold_unfinished_is_refused_unless_allowed(
    tmp_path: Path, trained_checkpoints: list[Path], capsys: pytest.CaptureFixture
) -> None:
    from covidseg.inference.loader import load_predictor
    from covidseg.kfold_summary import main as summary_main

    multirun = _multirun_of_folds(tmp_path, trained_checkpoints[0], finished=(0, 2))
    with pytest.raises(ModelFileError, match=r"with no finished run of fold\(s\) 1 .*allow_missing_folds=true"):
        load_predictor(str(multirun), tmp_path)
    allowed = load_predictor(str(multirun), tmp_path, allow_missing_folds=True)
    assert [path.parent.parent.name for path in allowed.paths] == ["0", "2"]
    assert run_command(summary_main, str(multirun)) == 2
    assert "has no finished run of fold(s) 1" in capsys.readouterr().err
    assert not (multirun / "kfold_summary.json").exists()
    assert run_command(summary_main, str(multirun), "--allow-missing-folds") == 0
    shutil.rmtree(multirun / "1")  # a fold deleted: the others still say there were three
    with pytest.raises(ModelFileError, match=r"fold\(s\) 1 "):
        load_predictor(str(multirun), tmp_path)
    shutil.rmtree(multirun / "2" / ".hydra")  # a finished job whose fold is no longer known
    with pytest.raises(ModelFileError, match=r"fold\(s\) 1, 2 .*job\(s\) 2 without a recorded"):
        load_predictor(str(multirun), tmp_path)
    assert run_command(summary_main, str(multirun), "--allow-missing-folds") == 0  # the one known, finished fold
    assert json.loads((multirun / "kfold_summary.json").read_text())["val/dice"]["n"] == 1
    shutil.rmtree(multirun / "0" / ".hydra")  # no job says what it ran: the multirun's own record does
    (multirun / "multirun.yaml").write_text("data:\n  num_folds: 3\n  fold: 0\n")
    assert run_command(summary_main, str(multirun)) == 2
    assert "job(s) 0, 2 without a recorded .hydra/config.yaml" in capsys.readouterr().err


def test_a_training_image_predict_would_refuse_is_refused_in_training_too(
    compose_cfg, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from covidseg.data.synthetic import SyntheticPhantoms
    from covidseg.train import train

    root = SyntheticPhantoms({"Train": 4, "Val": 2, "Test": 2}, classes=["COVID-19"], image_size=64).write(
        tmp_path / "data"
    )
    image = root / "Train" / "COVID-19" / "images" / "covid-19_0000.png"
    for folder in ("images", "infection masks"):  # a 10000x1 strip, mask and all
        (root / "Train" / "COVID-19" / folder / image.name).write_bytes(png_bytes(np.zeros((1, 10_000), np.uint8)))
    settings = [o for o in FAST if not o.startswith(("data=", "data.synthetic"))]
    cfg = compose_cfg("train", [*settings, f"data.root={root}"])
    with pytest.raises(SystemExit) as stopped, user_errors():
        train(cfg)
    error = capsys.readouterr().err.strip()
    assert stopped.value.code == 2 and "covid-19_0000.png' is 10000x1 pixels: expected a chest X-ray" in error


def test_a_file_the_disk_cannot_read_is_one_line_naming_it(tmp_path: Path, monkeypatch) -> None:
    from covidseg.core import files

    image = tmp_path / "bad.png"
    image.write_bytes(png_bytes(np.zeros((64, 64), np.uint8)))
    real_fdopen = os.fdopen

    class FailingDisk:
        def __init__(self, handle):
            self.file = real_fdopen(handle, "rb")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def fileno(self):
            return self.file.fileno()

        def read(self, *args):
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(files.os, "fdopen", lambda handle, mode: FailingDisk(handle))
    with pytest.raises(DataError, match=r"bad.png' could not be read: Input/output error; expected an image file"):
        files.read_file_bytes(image, 1 << 20, "an image file", DataError)


def test_an_empty_ckpt_path_is_not_the_current_folder(tmp_path: Path) -> None:
    from covidseg.inference.loader import load_predictor

    for value in ("", "  "):
        with pytest.raises(ModelFileError, match="names no model"):
            load_predictor(value, tmp_path)


# --- messages that say what to do ------------------------------------------------------------------------------


def test_images_that_broke_the_readers_get_a_line_that_says_what_to_do() -> None:
    import io
    import struct
    import zlib

    import pydicom
    from pydicom.uid import JPEG2000Lossless

    from covidseg.core.images import decode_unchanged

    no_pixels = pydicom.dcmread(io.BytesIO(dicom_bytes(np.zeros((64, 64), np.uint16))))
    del no_pixels.PixelData
    buffer = io.BytesIO()
    no_pixels.save_as(buffer, enforce_file_format=True)
    with pytest.raises(DataError, match="is a DICOM file without pixel data"):
        decode_unchanged(buffer.getvalue(), "x.dcm")

    jpeg2000 = pydicom.dcmread(io.BytesIO(dicom_bytes(np.zeros((64, 64), np.uint16))))
    jpeg2000.file_meta.TransferSyntaxUID = JPEG2000Lossless
    jpeg2000.PixelData = pydicom.encaps.encapsulate([b"\xff\x4f\xff\x51" + b"\0" * 64])
    buffer = io.BytesIO()
    jpeg2000.save_as(buffer, enforce_file_format=True)
    with pytest.raises(DataError, match=r"compressed as JPEG 2000.*(pixel data is damaged|pip install pylibjpeg)"):
        decode_unchanged(buffer.getvalue(), "x.dcm")

    png = png_bytes(np.full((64, 64), 90, np.uint8))
    text = b"Comment\0\0" + zlib.compress(b"a" * 5_000_000)
    chunk = struct.pack(">I", len(text)) + b"zTXt" + text + struct.pack(">I", zlib.crc32(b"zTXt" + text))
    with pytest.raises(DataError, match="text chunk .* save the image again without its metadata"):
        decode_unchanged(png[:33] + chunk + png[33:], "bomb.png")


def test_serve_checks_its_address_before_it_loads_the_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from covidseg.serve import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases = [("host=999.1.1.1", "host='999.1.1.1'"), (f"port={port}", f"port={port}: Address already in use")]
        for number, (override, message) in enumerate(cases):
            arguments = [
                "ckpt_path=/nonexistent.ckpt",
                "host=127.0.0.1",
                override,
                f"hydra.run.dir={tmp_path / str(number)}",
            ]
            assert run_command(main, *arguments) == 2
            error = capsys.readouterr().err.strip()
            assert message in error and len(error.splitlines()) == 1, error  # not the model's error: checked first


def test_convert_names_the_file_and_never_advises_unpickling(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import argparse

    from covidseg.convert import main

    source = tmp_path / "old.ckpt"
    torch.save({"covidseg_config": argparse.Namespace()}, source)  # a class: weights_only=True refuses it
    assert run_command(main, str(source), str(tmp_path / "new.ckpt")) == 2
    error = capsys.readouterr().err
    assert "old.ckpt' holds objects other than tensors" in error and "weights_only=False" not in error
    (tmp_path / "garbage.ckpt").write_bytes(b"\0garbage")
    assert run_command(main, str(tmp_path / "garbage.ckpt"), str(tmp_path / "new.ckpt")) == 2
    assert "garbage.ckpt' is not a checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "new.ckpt").exists()


# --- runs started at once, as processes --------------------------------------------------------------------------


@pytest.mark.slow
def test_two_evals_started_at_once_keep_separate_folders_and_complete_outputs(tmp_path: Path) -> None:
    env = {**os.environ, "COVIDSEG_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "covidseg.eval", "ckpt_path=pretrained", *FAST[:5], "data.eval_classes=[COVID-19]",
               f"paths.log_dir={tmp_path / 'outputs'}", "callbacks=none", "bf16=false"]  # fmt: skip
    processes = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    results = [(process.wait(timeout=600), process.stderr.read().decode()) for process in processes]
    assert all(code == 0 for code, _ in results), results
    runs = sorted((tmp_path / "outputs" / "eval" / "runs").iterdir())
    assert len(runs) == 2
    for run in runs:
        assert {"metrics.json", "per_image.csv", "report.html", "run_info.json", RUN_MARKER} <= set(os.listdir(run))
        assert len((run / "per_image.csv").read_text().splitlines()) == 5  # a header and the four Test images


def test_ctrl_c_outside_training_is_one_line_and_exit_130(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stopped, user_errors():
        raise KeyboardInterrupt
    assert stopped.value.code == 130 and capsys.readouterr().err.strip().startswith("error: stopped by Ctrl-C")


def test_other_path_keys_cannot_point_a_run_at_the_users_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from covidseg.eval import main

    folder = users_folder(tmp_path)
    before = checksums(folder)
    common = ["ckpt_path=pretrained", *FAST[:5], f"paths.log_dir={tmp_path / 'outputs'}"]
    for override, message in (
        (f"paths.output_dir={folder}", "paths.output_dir"),
        (f"hydra.output_subdir={folder}", "expected a name inside the run folder"),
        ("hydra.output_subdir=../..", "expected a name inside the run folder"),
    ):
        assert run_command(main, *common, override) == 2, override
        assert message in capsys.readouterr().err
    assert checksums(folder) == before


def test_two_resumes_of_one_run_at_once_the_second_is_refused(compose_cfg, capsys: pytest.CaptureFixture) -> None:
    from covidseg.train import train

    cfg = compose_cfg("train", [*FAST, "test=false", "logger=csv"])
    train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    (run_dir / ".hydra").mkdir(exist_ok=True)
    (run_dir / ".hydra" / "config.yaml").write_text(__import__("omegaconf").OmegaConf.to_yaml(cfg))
    resume = compose_cfg("train", [*FAST, "test=false", "logger=csv", f"ckpt_path={run_dir / 'checkpoints/last.ckpt'}",
                                   "trainer.max_epochs=2"])  # fmt: skip
    with exclusive_lock(run_dir) as locked:  # as a resume of this run holds it
        assert locked
        with pytest.raises(SystemExit) as stopped, user_errors():
            train(resume)
    assert stopped.value.code == 2 and "is being resumed by another training" in capsys.readouterr().err


def test_a_folder_of_unrelated_runs_is_no_ensemble_and_temporary_files_are_no_checkpoints(
    tmp_path: Path, trained_checkpoints: list[Path]
) -> None:
    from covidseg.inference.loader import best_checkpoint, load_predictor

    runs = tmp_path / "runs"
    for index, checkpoint in enumerate(trained_checkpoints):
        (runs / str(index) / "checkpoints").mkdir(parents=True)
        shutil.copy(checkpoint, runs / str(index) / "checkpoints" / checkpoint.name)
    with pytest.raises(ModelFileError, match="is not a multirun"):
        load_predictor(str(runs), tmp_path)
    (runs / "0" / "checkpoints" / ".epoch009-dice0.9999.ckpt.x1y2.tmp.ckpt").write_bytes(b"")  # a killed save
    assert best_checkpoint(runs / "0").name == trained_checkpoints[0].name


def test_settings_lightning_refuses_late_are_one_line_too(compose_cfg, capsys: pytest.CaptureFixture) -> None:
    from covidseg.calibrate import calibrate
    from covidseg.train import train

    cfg = compose_cfg("train", [*FAST, "trainer.limit_train_batches=0.0001"])
    with pytest.raises(SystemExit) as stopped, user_errors():
        train(cfg)
    error = capsys.readouterr().err.strip()
    assert stopped.value.code == 2 and len(error.splitlines()) == 1 and "limit_train_batches" in error, error
    cfg = compose_cfg("calibrate", ["ckpt_path=pretrained", *FAST[:5], "data.eval_classes=[COVID-19]"])
    with pytest.raises(SystemExit) as stopped, user_errors():
        calibrate(cfg)
    assert "calibration needs X-rays with and without infection" in capsys.readouterr().err


def test_a_deflated_dicom_is_refused_before_it_inflates() -> None:
    import io

    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    from covidseg.core.images import decode_unchanged

    dataset = pydicom.dcmread(io.BytesIO(dicom_bytes(np.zeros((64, 64), np.uint16))))
    dataset.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    with pytest.raises(DataError, match="is deflated DICOM"):
        decode_unchanged(buffer.getvalue(), "bomb.dcm")


def test_an_input_whose_outputs_cannot_be_named_is_that_images_failure(
    tmp_path: Path, trained_checkpoints: list[Path]
) -> None:
    from covidseg.predict import predict

    inputs = xray_folder(tmp_path, "short.png", f"{'a' * 245}.png")  # "<name>.mask.png" is over 255 bytes
    cfg = __import__("covidseg.core.config", fromlist=["x"]).compose_config(
        "predict", [f"ckpt_path={trained_checkpoints[0]}", f"input={inputs}", f"output={tmp_path / 'out'}"],
        output_dir=tmp_path / "run", log_dir=tmp_path / "outputs",
    )  # fmt: skip
    run = predict(cfg)
    assert [Path(row["file"]).name for row in run.rows] == ["short.png"] and len(run.failed) == 1


def test_learning_curves_replace_their_own_charts_only_and_skip_a_fifo(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from torch.utils.tensorboard import SummaryWriter

    from covidseg.learning_curves import main

    run_dir = tmp_path / "run"
    (run_dir / "tensorboard").mkdir(parents=True)
    (run_dir / "run_info.json").write_text('{"started": 0}')
    with SummaryWriter(str(run_dir / "tensorboard")) as writer:
        for step in range(3):
            writer.add_scalar("val/dice", 0.1 * step, step)
    os.mkfifo(run_dir / "tensorboard" / "events.out.tfevents.0.fifo")  # read, it would block forever
    assert run_command(main, str(run_dir)) == 0
    assert run_command(main, str(run_dir)) == 0  # a rerun replaces the charts the first one wrote
    for name, users in (
        ("learning_curves.png", png_bytes(np.zeros((8, 8), np.uint8))),
        ("val_dice_by_time.csv", b"a,b\n"),
    ):
        chart = run_dir / name
        chart.write_bytes(users)
        capsys.readouterr()
        assert run_command(main, str(run_dir)) == 2
        assert (
            "was not written by covidseg (or by a version that did not mark its files): it is left"
            in capsys.readouterr().err
        )
        assert chart.read_bytes() == users
        chart.unlink()


def test_benchmarks_write_each_run_s_figures_to_a_folder_of_their_own(tmp_path: Path) -> None:
    from covidseg.core.writing import new_figures_folder

    folders = [new_figures_folder(tmp_path / "bench") for _ in range(3)]  # within one second
    assert len(set(folders)) == 3 and all(folder.parent == tmp_path / "bench" for folder in folders)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied_as_viewers_apply_it(orientation: int) -> None:
    import io

    from PIL import Image, ImageOps

    from covidseg.core.images import decode_unchanged

    stored = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 64), dtype=np.uint8))
    exif = stored.getexif()
    exif[0x0112] = orientation
    for kind in ("JPEG", "PNG", "TIFF"):  # OpenCV turns TIFF itself, and must not turn it twice
        encoded = io.BytesIO()
        stored.save(encoded, format=kind, exif=exif.tobytes())
        upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(encoded.getvalue()))))
        decoded, _ = decode_unchanged(encoded.getvalue(), "phone.jpg")
        assert decoded.shape == upright.shape, kind
        assert np.abs(decoded.astype(int) - upright.astype(int)).max() <= 8, kind


def test_a_nan_image_and_a_fifo_among_training_images_are_named_for_what_they_are(tmp_path: Path) -> None:
    from covidseg.core.images import decode_unchanged
    from covidseg.data.index import index_split
    from covidseg.data.synthetic import SyntheticPhantoms

    pixels = np.full((64, 64), np.nan, np.float32)
    pixels[:32] = 0.5
    with pytest.raises(DataError, match="holds NaN or infinite pixel values"):
        decode_unchanged(png_bytes(pixels, ".tiff"), "nan.tiff")
    root = SyntheticPhantoms({"Train": 1}, classes=["COVID-19"], image_size=32).write(tmp_path / "data")
    os.mkfifo(root / "Train" / "COVID-19" / "images" / "covid-19_0001.png")
    with pytest.raises(DataError, match=r"covid-19_0001.png' is a folder, pipe, socket or device, not an image"):
        index_split(root, "Train")


# --- the third adversarial pass ----------------------------------------------------------------------------


@pytest.mark.parametrize(("damage", "message"), [("nan", "holds NaN or infinite values"), ("int", "holds torch.int64")])
def test_weights_that_are_not_finite_real_numbers_are_refused(
    damage: str, message: str, trained_checkpoints: list[Path], tmp_path: Path
) -> None:
    from covidseg.inference.loader import load_predictor

    checkpoint = torch.load(trained_checkpoints[0], weights_only=True)
    name = next(key for key, value in checkpoint["state_dict"].items() if value.is_floating_point())
    weights = checkpoint["state_dict"][name]
    checkpoint["state_dict"][name] = weights.clone().fill_(float("nan")) if damage == "nan" else weights.long()
    damaged = tmp_path / "damaged.ckpt"
    torch.save(checkpoint, damaged)
    with pytest.raises(ModelFileError, match=message):
        load_predictor(str(damaged), tmp_path)


def test_nearly_blank_pictures_and_odd_dicoms_are_refused_by_name() -> None:
    from covidseg.core.images import DEFLATED_DICOM, decode_dicom, decode_unchanged, xray_gray

    one_pixel_on = np.zeros((256, 256), np.uint8)
    one_pixel_on[128, 128] = 255
    with pytest.raises(DataError, match=r"'one.png' is nearly blank \(100.00% of its pixels are grey level 0\)"):
        xray_gray(one_pixel_on, "one.png")
    with pytest.raises(DataError, match=r"'f64.tif' is a TIFF of a kind that cannot be read safely .* 8- or 16-bit"):
        decode_unchanged(png_bytes(np.random.default_rng(0).random((64, 64)), ".tiff"), "f64.tif")
    padded_meta = b"\0" * 128 + b"DICM" + b"\0" * 5000 + DEFLATED_DICOM  # the syntax pushed past the usual meta
    with pytest.raises(DataError, match="is deflated DICOM"):
        decode_dicom(padded_meta, "padded.dcm")


def test_a_phone_s_multi_picture_jpeg_is_read_as_a_jpeg() -> None:
    import io

    from PIL import Image

    from covidseg.core.images import decode_unchanged

    pixels = np.random.default_rng(0).integers(0, 255, (64, 48), dtype=np.uint8)
    encoded = io.BytesIO()
    Image.fromarray(pixels).save(encoded, format="MPO", save_all=True, append_images=[Image.fromarray(pixels)])
    assert Image.open(io.BytesIO(encoded.getvalue())).format == "MPO"
    decoded, kind = decode_unchanged(encoded.getvalue(), "phone.jpg")
    assert kind == "JPEG" and decoded.shape == (64, 48)


def test_kfold_summary_never_replaces_a_summary_of_the_user_s_and_refuses_an_empty_one(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from covidseg.kfold_summary import main

    multirun = tmp_path / "multirun"
    (multirun / "0").mkdir(parents=True)
    (multirun / "multirun.yaml").write_text("hydra: {}\n")
    (multirun / "0" / "metrics.json").write_text('{"other/x": 1.0}')
    assert run_command(main, str(multirun)) == 2
    assert "share no val/, test/ or severity/ metric" in capsys.readouterr().err
    (multirun / "0" / "metrics.json").write_text('{"val/dice": 0.5}')
    (multirun / "1").mkdir()
    (multirun / "1" / "metrics.json").write_text('{"val/dice": 0.7}')  # a second seed
    assert run_command(main, str(multirun)) == 0
    spread = json.loads((multirun / "kfold_summary.json").read_text())["val/dice"]
    assert spread == {
        "mean": pytest.approx(0.6),
        "std": pytest.approx(0.1414, abs=1e-4),
        "min": 0.5,
        "max": 0.7,
        "n": 2,
    }
    assert "| val/dice | 0.6000 | 0.1414 | 0.5000 | 0.7000 | 2 |" in (multirun / "kfold_summary.md").read_text()
    assert run_command(main, str(multirun)) == 0  # its own summary, replaced
    (multirun / "kfold_summary.md").write_text("my notes on these folds\n")
    assert run_command(main, str(multirun)) == 2
    assert "kfold_summary.md' was not written by covidseg (or by a version" in capsys.readouterr().err
    assert (multirun / "kfold_summary.md").read_text() == "my notes on these folds\n"


def test_a_resume_cannot_lengthen_a_schedule_fixed_in_steps(compose_cfg, capsys: pytest.CaptureFixture) -> None:
    from omegaconf import OmegaConf

    from covidseg.train import train

    settings = [*FAST, "experiment=quickstart", "test=false", "logger=csv"]
    cfg = compose_cfg("train", settings)
    train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    (run_dir / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    before = checksums(run_dir)
    longer = [*settings, "trainer.max_epochs=2", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"]
    with pytest.raises(SystemExit) as stopped, user_errors():
        train(compose_cfg("train", longer))
    error = capsys.readouterr().err
    assert stopped.value.code == 2 and "(OneCycleLR) was fixed in steps" in error and "max_epochs (1 -> 2)" in error
    assert checksums(run_dir) == before
    elsewhere = run_dir.parent / "copied" / "last.ckpt"  # outside its run: nothing recorded to compare with
    elsewhere.parent.mkdir()
    shutil.copy(run_dir / "checkpoints" / "last.ckpt", elsewhere)
    copied = [*settings, "trainer.max_epochs=2", f"ckpt_path={elsewhere}"]
    with pytest.raises(SystemExit) as stopped, user_errors():
        train(compose_cfg("train", copied))
    assert stopped.value.code == 2 and "the learning-rate schedule restored from it ended" in capsys.readouterr().err


def test_eval_scores_something_and_gives_ctrl_c_back_as_130(
    compose_cfg, trained_checkpoints: list[Path], monkeypatch, capsys: pytest.CaptureFixture
) -> None:
    from covidseg.eval import evaluate
    from covidseg.inference.predictor import PredictorModule

    data = [o for o in FAST if o.startswith("data")]
    nothing = compose_cfg("eval", [f"ckpt_path={trained_checkpoints[0]}", *data, "trainer.limit_test_batches=0"])
    with pytest.raises(SystemExit) as stopped, user_errors():
        evaluate(nothing)
    assert stopped.value.code == 2 and "limit_test_batches=0 scores no image" in capsys.readouterr().err
    mixed = compose_cfg("eval", [f"ckpt_path={trained_checkpoints[0]}", *data, "trainer.precision=bf16-mixed"])
    with pytest.raises(SystemExit) as stopped, user_errors():
        evaluate(mixed)
    assert stopped.value.code == 2 and "with bf16=true" in capsys.readouterr().err

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(PredictorModule, "test_step", ctrl_c)
    with pytest.raises(SystemExit) as stopped, user_errors():
        evaluate(compose_cfg("eval", [f"ckpt_path={trained_checkpoints[0]}", *data]))
    assert stopped.value.code == 130 and "stopped by Ctrl-C" in capsys.readouterr().err


def test_benchmarks_refuse_what_they_choose_themselves_in_one_line(capsys: pytest.CaptureFixture) -> None:
    from covidseg.benchmarks import serve, throughput

    assert run_command(serve.main, "--requests", "2", "port=18799") == 2
    assert "the benchmark picks the server's host, port, hydra.run.dir itself" in capsys.readouterr().err
    assert run_command(throughput.main, "--steps", "1", "trainer.max_epoch=3") == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error:") and len(error.splitlines()) == 1 and "max_epoch" in error


def test_an_empty_cache_dir_and_calibrating_on_test_are_refused(
    trained_checkpoints: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from covidseg.calibrate import main as calibrate_main
    from covidseg.train import main as train_main

    assert run_command(train_main, *FAST, "paths.cache_dir=", f"hydra.run.dir={tmp_path / 'run'}") == 2
    assert "paths.cache_dir='': expected a folder" in capsys.readouterr().err
    on_test = [
        f"ckpt_path={trained_checkpoints[0]}",
        "data=synthetic",
        "data.split=Test",
        f"hydra.run.dir={tmp_path / 'c'}",
    ]
    assert run_command(calibrate_main, *on_test) == 2
    assert "data.split=Test: thresholds are chosen on Val" in capsys.readouterr().err


def test_a_full_disk_while_writing_phantoms_leaves_nothing_half_written(tmp_path: Path, monkeypatch) -> None:
    from covidseg.data.synthetic import SyntheticPhantoms

    written = []
    real_write = Path.write_bytes

    def fills_up(self: Path, data: bytes) -> int:
        if len(written) >= 5:
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        written.append(self)
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", fills_up)
    with pytest.raises(OSError, match="No space left"):
        SyntheticPhantoms({"Train": 4}, image_size=32).write(tmp_path / "synthetic")
    monkeypatch.undo()
    assert not (tmp_path / "synthetic").exists() and not list(tmp_path.glob(".synthetic-*"))
    SyntheticPhantoms({"Train": 4}, image_size=32).write(tmp_path / "synthetic")  # the next run writes it whole
    assert len(list((tmp_path / "synthetic").rglob("*.png"))) == 4 * 3 * 3


def test_read_only_folders_name_the_file_and_a_folder_is_no_file(tmp_path: Path, monkeypatch) -> None:
    import tempfile

    from covidseg.core.files import read_file_bytes

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(OSError) as raised:
        write_atomic(tmp_path / "kfold_summary.json", "{}")
    assert raised.value.filename == str(tmp_path / "kfold_summary.json")
    monkeypatch.undo()
    with pytest.raises(DataError, match="is a folder; expected a run's recorded config"):
        read_file_bytes(tmp_path, 100, "a run's recorded config", DataError)


def test_two_jobs_of_one_fold_are_refused(tmp_path: Path, trained_checkpoints: list[Path]) -> None:
    from covidseg.inference.loader import load_predictor

    multirun = _multirun_of_folds(tmp_path, trained_checkpoints[0], finished=(0, 1, 2))
    shutil.copytree(multirun / "0", multirun / "7")  # a copy of fold 0 beside the others
    with pytest.raises(ModelFileError, match=r"jobs '0' and '7' .* both ran fold 0"):
        load_predictor(str(multirun), tmp_path)


def test_a_second_ctrl_c_to_the_server_is_one_line_not_starlette_s_traceback() -> None:
    import logging

    from covidseg.serve import quiet_forced_shutdown

    lifespan = "Traceback (most recent call last):\n  File ...\nasyncio.exceptions.CancelledError\n"
    record = logging.LogRecord("uvicorn.error", logging.ERROR, __file__, 1, lifespan, (), None)
    assert quiet_forced_shutdown(record) and record.getMessage() == "stopped at once by a second Ctrl-C"
    other = logging.LogRecord("uvicorn.error", logging.ERROR, __file__, 1, "Exception in ASGI application", (), None)
    assert quiet_forced_shutdown(other) and other.getMessage() == "Exception in ASGI application"  # kept


@pytest.mark.parametrize("share", [-1, 0, 1.5, "half", True])
def test_a_zone_threshold_outside_0_1_is_one_line(share: object) -> None:
    from covidseg.core.errors import ConfigError
    from covidseg.evaluation.collectors import SeverityOnTest

    with pytest.raises(ConfigError, match=r"callbacks.severity.zone_threshold=.*between 0 and 1"):
        SeverityOnTest(share)  # type: ignore[arg-type]
