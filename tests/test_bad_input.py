"""Lose nothing, crash never: unusual names, damaged caches, folders that are not covidseg's, and
predict's inputs and outputs. Each case uses data the test makes itself; "nothing overwritten"
is checked by checksum."""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import FAST
from helpers import dicom_bytes, run_command

from covidseg.core.errors import DataError
from covidseg.data import SyntheticPhantoms
from covidseg.data.decode import decode_samples
from covidseg.data.index import index_split
from covidseg.inference.image_files import OUTPUT_MARKER
from covidseg.predict import predict

NOT_UTF8 = os.fsdecode(b"covid-19_\xff\xfe.png")  # a name that is not valid UTF-8


def checksums(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` (links not followed) by its SHA-256."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not path.is_symlink()
    }


# --- covidseg deletes only what it owns -------------------------------------------------------


def test_synthetic_data_with_other_settings_is_rewritten_only_when_nothing_else_is_there(tmp_path: Path) -> None:
    root = SyntheticPhantoms({"Train": 1}, image_size=32).write(tmp_path / "synthetic")
    (root / "Train" / "notes.txt").write_text("the user's own notes")
    before = checksums(root)
    with pytest.raises(DataError, match=r"holds 1 file\(s\) the synthetic generator did not write .*notes.txt"):
        SyntheticPhantoms({"Train": 2}, image_size=32).write(root)
    assert checksums(root) == before
    (root / "Train" / "notes.txt").unlink()
    SyntheticPhantoms({"Train": 2}, image_size=32).write(root)  # only its own files: rewritten
    assert len(list((root / "Train" / "Normal" / "images").glob("*.png"))) == 2
    SyntheticPhantoms({"Val": 1}, image_size=32).write(root)  # the previous files removed, none left over
    assert sorted(p.name for p in root.iterdir()) == ["Val", "synthetic.json"]
    assert not list(root.parent.glob(".synthetic-*"))  # the staging folder is gone
    empty = tmp_path / "empty"
    empty.mkdir()
    inode = empty.stat().st_ino
    SyntheticPhantoms({"Train": 1}, image_size=32).write(empty)  # the user's empty folder is filled, not replaced
    assert empty.stat().st_ino == inode and (empty / "synthetic.json").is_file()


def test_synthetic_data_with_empty_folders_is_rewritten_whole(tmp_path: Path) -> None:
    """A split of 0 phantoms leaves folders without files; a rewrite removes them too (they once
    blocked it, "Directory not empty", and left the folder without its marker: unusable)."""
    root = SyntheticPhantoms({"Train": 0, "Val": 1}, image_size=32).write(tmp_path / "synthetic")
    assert (root / "Train" / "Normal" / "images").is_dir()
    SyntheticPhantoms({"Train": 1}, image_size=32).write(root)
    assert sorted(p.name for p in root.iterdir()) == ["Train", "synthetic.json"]
    assert len(list((root / "Train" / "Normal" / "images").glob("*.png"))) == 1


def test_a_marker_that_is_not_covidseg_s_is_refused(tmp_path: Path) -> None:
    (tmp_path / "synthetic.json").write_text('{"counts": {"Train": 1}, "rm": "-rf"}')
    (tmp_path / "keep.png").write_bytes(b"user data")
    with pytest.raises(DataError, match="is not a synthetic-data marker"):
        SyntheticPhantoms({"Train": 1}).write(tmp_path)
    assert (tmp_path / "keep.png").read_bytes() == b"user data"


@pytest.mark.parametrize("forgery", ["user_file_under_a_phantom_name", "marker_without_digests", "link"])
def test_a_file_of_the_user_s_under_a_phantom_name_is_never_replaced(tmp_path: Path, forgery: str) -> None:
    """The marker records each phantom's digest: a file that is not the phantom it recorded (changed,
    put there by the user, a link) or a marker without digests stops the rewrite, nothing removed."""
    root = SyntheticPhantoms({"Train": 1}, image_size=32).write(tmp_path / "synthetic")
    phantom = root / "Train" / "COVID-19" / "images" / "covid-19_0000.png"
    if forgery == "user_file_under_a_phantom_name":
        phantom.write_bytes(b"the user's own X-ray")
    elif forgery == "marker_without_digests":
        (root / "synthetic.json").write_text(
            '{"counts": {"Train": 1}, "classes": ["COVID-19", "Non-COVID", "Normal"], "image_size": 32, "seed": 0}'
        )
    else:
        (tmp_path / "elsewhere.png").write_bytes(phantom.read_bytes())
        phantom.unlink()
        phantom.symlink_to(tmp_path / "elsewhere.png")
    before = checksums(root)
    expected = "older covidseg" if forgery == "marker_without_digests" else r"did not write \(e.g. .*covid-19_0000.png"
    with pytest.raises(DataError, match=expected):
        SyntheticPhantoms({"Val": 1}, image_size=32).write(root)
    assert checksums(root) == before


# --- the decode cache heals itself ------------------------------------------------------------


@pytest.fixture
def dataset_root(tmp_path: Path) -> Path:
    return SyntheticPhantoms({"Train": 3, "Val": 2}, image_size=32, seed=3).write(tmp_path / "data")


@pytest.mark.parametrize("damage", ["truncate", "other_values", "no_metadata", "garbage"])
def test_a_damaged_cache_entry_is_rebuilt_with_a_note(
    dataset_root: Path, tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "cache"
    samples = index_split(dataset_root, "Train")
    # copies: the entry is mapped, and the damage below is done in place, under the map
    images, masks = (np.array(array) for array in decode_samples(samples, 32, cache))
    (entry,) = cache.glob("*-images.npy")
    if damage == "truncate":
        entry.write_bytes(entry.read_bytes()[:200])
    elif damage == "other_values":
        np.save(entry, np.zeros_like(images))  # the right shape and type, the wrong content
    elif damage == "no_metadata":
        next(cache.glob("*.json")).unlink()
    else:
        entry.write_bytes(b"\x93NUMPY not really")
    with caplog.at_level(logging.WARNING):
        again, again_masks = decode_samples(samples, 32, cache)
    assert "is damaged" in caplog.text and "rebuilding it" in caplog.text
    assert np.array_equal(again, images) and np.array_equal(again_masks, masks)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        decode_samples(samples, 32, cache)  # rebuilt: intact again
    assert "damaged" not in caplog.text


# --- any file name ------------------------------------------------------------------------------


def _rename_to_not_utf8(root: Path) -> None:
    """Give one COVID-19 training image and its masks a name that is not valid UTF-8."""
    for sub in ("images", "infection masks", "lung masks"):
        folder = root / "Train" / "COVID-19" / sub
        os.rename(folder / "covid-19_0000.png", folder / NOT_UTF8)


def test_names_that_are_not_utf8_decode_and_print_escaped(dataset_root: Path, tmp_path: Path) -> None:
    _rename_to_not_utf8(dataset_root)
    samples = index_split(dataset_root, "Train")
    names = [sample.name for sample in samples]
    assert "Train/COVID-19/covid-19_\\udcff\\udcfe.png" in names
    assert all(name.encode("utf-8") for name in names)  # printable
    images, _ = decode_samples(samples, 32, tmp_path / "cache")
    cached, _ = decode_samples(samples, 32, tmp_path / "cache")
    assert np.array_equal(images, cached)


@pytest.mark.slow
@pytest.mark.parametrize("cache", [True, False])
def test_training_reads_names_that_are_not_utf8(compose_cfg, tmp_path: Path, cache: bool) -> None:
    from covidseg.train import train

    root = SyntheticPhantoms({"Train": 8, "Val": 4}, image_size=64, seed=4).write(tmp_path / "odd")
    _rename_to_not_utf8(root)
    data = [o for o in FAST if not o.startswith(("data=", "data.synthetic"))]
    extra = [f"data.cache_dir={tmp_path / 'decoded'}"] if cache else ["data.cache_dir=null"]
    metrics, _ = train(compose_cfg("train", [*data, f"data.root={root}", "test=false", "logger=csv", *extra]))
    assert 0 <= metrics["val/dice"] <= 1 and metrics["global_step"] == 2


# --- predict: outputs never touch inputs ----------------------------------------------------------


def _image(path: Path, seed: int = 0, size: tuple[int, int] = (70, 90)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, data = cv2.imencode(path.suffix, np.random.default_rng(seed).integers(0, 255, size, dtype=np.uint8))
    assert ok
    path.write_bytes(data.tobytes())
    return path


@pytest.fixture(scope="module")
def checkpoint(trained_checkpoints: list[Path]) -> Path:
    return trained_checkpoints[0]


def _predict(compose_cfg, checkpoint: Path, source: str | Path, output: Path, *extra: str):
    return predict(compose_cfg("predict", [f"ckpt_path={checkpoint}", f"input={source}", f"output={output}", *extra]))


@pytest.mark.slow
@pytest.mark.parametrize("form", ["file", "glob", "folder"])
def test_outputs_never_land_beside_the_inputs(compose_cfg, checkpoint: Path, tmp_path: Path, form: str) -> None:
    folder = tmp_path / "xrays"
    image = _image(folder / "x.png")
    (folder / "x.png.mask.png").write_bytes(b"the user's own file that happens to share the name")
    (folder / "x_mask.png").write_bytes(b"another file of the user's")
    before = checksums(tmp_path)
    source = {"file": image, "glob": f"{folder}/*.png", "folder": folder}[form]
    for output in (folder, folder / "out") if form == "folder" else (folder,):
        with pytest.raises(DataError, match="output .* (holds input files|is inside the input folder)"):
            _predict(compose_cfg, checkpoint, source, output)
    assert checksums(tmp_path) == before


@pytest.mark.slow
def test_same_names_with_other_suffixes_stay_apart_and_links_are_followed_once(
    compose_cfg, checkpoint: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "xrays"
    _image(folder / "x.png", seed=1)
    _image(folder / "x.jpg", seed=2, size=(40, 50))
    _image(folder / "sub" / "y.png", seed=3)
    (folder / "sub" / "loop").symlink_to(folder, target_is_directory=True)  # a folder loop
    (folder / "again.png").symlink_to(folder / "x.png")  # the same file under a second name
    before = checksums(folder)
    for source, output in ((folder, tmp_path / "a"), (f"{folder}/**/*", tmp_path / "b")):
        run = _predict(compose_cfg, checkpoint, source, output)
        names = sorted(Path(row["file"]).name for row in run.rows)
        assert names == ["x.jpg", "x.png", "y.png"], names  # each file once, the loop not followed
        assert cv2.imread(str(output / "x.png.mask.png"), 0).shape == (70, 90)
        assert cv2.imread(str(output / "x.jpg.mask.png"), 0).shape == (40, 50)
        assert (output / "sub" / "y.png.overlay.png").is_file()
    assert checksums(folder) == before


@pytest.mark.slow
def test_a_failed_write_is_an_error_for_that_image(compose_cfg, checkpoint: Path, tmp_path: Path) -> None:
    folder = tmp_path / "xrays"
    _image(folder / "a.png", seed=1)
    _image(folder / "b.png", seed=2)
    output = tmp_path / "out"
    (output / "a.png.mask.png").mkdir(parents=True)  # something in the way of a's mask
    (output / OUTPUT_MARKER).touch()  # in a folder predict wrote into before (else it is refused up front)
    run = _predict(compose_cfg, checkpoint, folder, output)
    assert [Path(path).name for path, _ in run.failed] == ["a.png"] and "a.png.mask.png" in run.failed[0][1]
    with run.csv_path.open() as handle:
        assert [Path(row["file"]).name for row in csv.DictReader(handle)] == ["b.png"]
    assert not list(output.glob(".*.tmp"))  # no temporary file left behind


@pytest.mark.slow
def test_bad_outputs_and_odd_names(compose_cfg, checkpoint: Path, tmp_path: Path) -> None:
    folder = tmp_path / "xrays"
    _image(folder / NOT_UTF8)
    (tmp_path / "taken").write_text("a file, not a folder")
    with pytest.raises(DataError, match="output .*taken' is an existing file; expected a folder"):
        _predict(compose_cfg, checkpoint, folder, tmp_path / "taken")
    with pytest.raises(DataError, match="output .*taken/below' cannot be made: Not a directory"):
        _predict(compose_cfg, checkpoint, folder, tmp_path / "taken" / "below")
    assert (tmp_path / "taken").read_text() == "a file, not a folder"
    run = _predict(compose_cfg, checkpoint, folder, tmp_path / "out")
    assert run.rows[0]["file"].endswith("covid-19_\\udcff\\udcfe.png")
    assert (tmp_path / "out" / f"{NOT_UTF8}.mask.png").is_file()
    with pytest.raises(DataError, match="names no image files"):
        _predict(compose_cfg, checkpoint, f"{tmp_path}/nothing/*.png", tmp_path / "out2")


@pytest.mark.slow
def test_images_that_hold_no_xray_are_skipped_with_the_reason(compose_cfg, checkpoint: Path, tmp_path: Path) -> None:
    """A blank frame, a thumbnail, a strip or a colour photograph: the network would answer with a
    confident mask, so predict lists them as skipped (exit code 3) and answers for the rest: a grey
    X-ray saved as RGB, also with a small red mark on it, is read."""
    folder = tmp_path / "xrays"
    gray = cv2.imread(str(_image(folder / "x.png")), cv2.IMREAD_GRAYSCALE)
    marked = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    cv2.imwrite(str(folder / "rgb.png"), marked)
    marked[5:15, 5:20] = (0, 0, 255)  # a red mark on 2 % of the image
    cv2.imwrite(str(folder / "marked.png"), marked)
    photo = np.random.default_rng(1).integers(0, 255, (70, 90, 3), dtype=np.uint8)  # colour noise
    cv2.imwrite(str(folder / "photo.jpg"), photo)
    tinted = cv2.merge([gray // 3, gray // 2, gray])  # a grey picture with a strong orange cast
    cv2.imwrite(str(folder / "tinted.png"), tinted)
    folder.joinpath("blank.png").write_bytes(cv2.imencode(".png", np.zeros((64, 64), np.uint8))[1].tobytes())
    folder.joinpath("tiny.png").write_bytes(cv2.imencode(".png", np.eye(8, dtype=np.uint8) * 255)[1].tobytes())
    folder.joinpath("strip.png").write_bytes(cv2.imencode(".png", np.eye(40, 200, dtype=np.uint8) * 255)[1].tobytes())
    run = _predict(compose_cfg, checkpoint, folder, tmp_path / "out")
    assert sorted(Path(row["file"]).name for row in run.rows) == ["marked.png", "rgb.png", "x.png"]
    reasons = {path.name: reason for path, reason in run.skipped}
    assert "is a colour picture (" in reasons["photo.jpg"] and "expected a grey chest X-ray" in reasons["photo.jpg"]
    assert "is a colour picture (" in reasons["tinted.png"]
    assert "has a single grey level (0)" in reasons["blank.png"]
    assert "is 8x8 pixels: expected a chest X-ray" in reasons["tiny.png"]
    assert "is 200x40 pixels" in reasons["strip.png"]
    assert not (tmp_path / "out" / "blank.png.mask.png").exists()


def test_pipes_and_devices_named_like_images_are_skipped_unread(compose_cfg, checkpoint: Path, tmp_path: Path) -> None:
    """A FIFO called ``b.png`` would block a plain read forever and a link to ``/dev/zero`` would never
    end; predict lists both as skipped and answers for the rest. SIGALRM ends the test if one blocks."""
    import signal

    def blocked(*_: object) -> None:
        raise TimeoutError("predict blocked on a file that is not a regular file")

    previous = signal.signal(signal.SIGALRM, blocked)
    folder = tmp_path / "xrays"
    _image(folder / "a.png")
    os.mkfifo(folder / "b.png")
    (folder / "zero.png").symlink_to("/dev/zero")
    (folder / "gone.png").symlink_to(folder / "nowhere.png")
    (folder / "dir.png").mkdir()  # a folder named like an image is searched, not read
    signal.alarm(60)
    try:
        run = _predict(compose_cfg, checkpoint, folder, tmp_path / "out")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert [Path(row["file"]).name for row in run.rows] == ["a.png"]
    reasons = {path.name: reason for path, reason in run.skipped}
    assert sorted(reasons) == ["b.png", "gone.png", "zero.png"]
    assert "is not a regular file (a pipe, socket or device)" in reasons["b.png"] and "regular" in reasons["zero.png"]


@pytest.mark.slow
def test_predict_replaces_only_what_it_wrote(compose_cfg, checkpoint: Path, tmp_path: Path) -> None:
    folder = tmp_path / "xrays"
    _image(folder / "x.png")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "x.png.overlay.png").write_bytes(b"the user's own overlay")
    (theirs / "notes.txt").write_text("the user's notes")
    before = checksums(theirs)
    with pytest.raises(DataError, match=r"already holds 'x.png.overlay.png', which predict did not write"):
        _predict(compose_cfg, checkpoint, folder, theirs)
    assert checksums(theirs) == before
    (theirs / "x.png.overlay.png").unlink()
    _predict(compose_cfg, checkpoint, folder, theirs)  # new names beside the user's notes
    first = checksums(theirs)
    assert (theirs / "notes.txt").read_text() == "the user's notes" and (theirs / "x.png.mask.png").is_file()
    _predict(compose_cfg, checkpoint, folder, theirs)  # its own files, replaced by a second run
    assert checksums(theirs).keys() == first.keys()


@pytest.mark.slow
def test_predict_on_onnx_exports_its_graph_into_the_cache(
    compose_cfg, checkpoint: Path, tmp_path: Path, cache_dir: Path
) -> None:
    """``backend=onnx`` with a checkpoint exports a graph first: into covidseg's cache, never over a
    user's file of that name in the output."""
    _image(tmp_path / "xrays" / "x.png")
    output = tmp_path / "out"
    output.mkdir()
    (output / "model.onnx").write_bytes(b"the user's own graph")
    (output / "model.json").write_text("the user's own notes")
    run = _predict(compose_cfg, checkpoint, tmp_path / "xrays", output, "backend=onnx")
    assert len(run.rows) == 1 and (output / "x.png.mask.png").is_file()
    assert (output / "model.onnx").read_bytes() == b"the user's own graph"
    assert (output / "model.json").read_text() == "the user's own notes"
    assert max(path.stat().st_size for path in (cache_dir / "graphs").glob("*.onnx")) > 10_000


# --- checkpoints as promised ------------------------------------------------------------------------


@pytest.mark.slow
def test_a_finished_runs_last_checkpoint_holds_its_final_step(compose_cfg) -> None:
    import torch

    from covidseg.train import train

    # the best checkpoint is the first epoch's (monitor: epoch, mode min): later epochs never improve
    never_improves = ["callbacks.model_checkpoint.monitor=epoch", "callbacks.model_checkpoint.mode=min"]
    cfg = compose_cfg("train", [*FAST, "trainer.max_epochs=3", "test=false", "logger=csv", *never_improves,
                                "callbacks.last_checkpoint.every_n_train_steps=1000"])  # fmt: skip
    metrics, _ = train(cfg)
    last = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == metrics["global_step"] == 6
    # stopped mid-epoch by max_steps (2 steps an epoch): the final step is still in last.ckpt
    cfg = compose_cfg("train", [*FAST, "trainer.max_epochs=10", "+trainer.max_steps=5", "test=false", "logger=csv",
                                "callbacks.last_checkpoint.every_n_train_steps=1000"])  # fmt: skip
    metrics, _ = train(cfg)
    last = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == metrics["global_step"] == 5


@pytest.mark.slow
def test_a_resume_with_other_settings_is_refused_and_leaves_the_run_files_alone(compose_cfg, tmp_path: Path) -> None:
    import shutil

    from omegaconf import OmegaConf

    from covidseg.core.errors import ConfigError
    from covidseg.train import train

    cfg = compose_cfg("train", [*FAST, "trainer.max_epochs=1", "test=false", "logger=csv"])
    train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")  # as Hydra records it
    last = run_dir / "checkpoints" / "last.ckpt"
    before = checksums(run_dir)
    resume = [*FAST, "trainer.max_epochs=2", "test=false", "logger=csv", f"ckpt_path={last}"]
    changed = [o.replace("data.batch_size=4", "data.batch_size=2") for o in resume] + ["seed=7"]
    with pytest.raises(
        ConfigError, match=r"data.batch_size \(4 -> 2\), data.seed \(42 -> 7\), seed \(42 -> 7\); resume with the same"
    ):
        train(compose_cfg("train", changed))
    assert checksums(run_dir) == before  # run_info.json, config and checkpoints untouched
    metrics, _ = train(compose_cfg("train", [*changed, "resume_with_changes=true"]))
    assert metrics["global_step"] == 2 + 4  # one epoch of 2 batches, then one of 4 at the new batch size
    recorded = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    assert recorded.data.batch_size == 2 and recorded.seed == 7
    assert len(list((run_dir / ".hydra").glob("config.before_resume_at_step*.yaml"))) == 1
    shutil.rmtree(run_dir)


# --- one error policy: every bad value is one line and exit code 2, before any work ----------------

TRAIN_CASES = [
    (["trainer.max_epochs=abc"], "trainer.max_epochs='abc': Input should be a valid integer"),
    (["data.batch_size=0"], "data.batch_size=0: Input should be greater than or equal to 1"),
    (["data.batch_size=-3"], "data.batch_size=-3: Input should be greater than or equal to 1"),
    (["data.eval_batch_size=0"], "data.eval_batch_size=0: Input should be greater than or equal to 1"),
    (["data.image_size=0"], "data.image_size=0: Input should be greater than or equal to 16"),
    (["data.image_size=abc"], "data.image_size='abc': Input should be a valid integer"),
    (["data.image_size=100"], "unet needs image sides divisible by 16 (one halving per level), got 100"),
    (["model.input_size=40"], "unet needs image sides divisible by 16 (one halving per level), got 40"),
    (
        ["model.net.depth=5", "data.image_size=48"],
        "unet needs image sides divisible by 32 (one halving per level), got 48",
    ),
    (["model.threshold=abc"], "model.threshold='abc': Input should be a valid number"),
    (["model.threshold=1.5"], "model.threshold=1.5: Input should be less than 1"),
    (["data.classes=[Cats]"], "data.classes.0='Cats': Input should be 'COVID-19', 'Non-COVID' or 'Normal'"),
    (["data.targets=[tumour]"], "data.targets.0='tumour': Input should be 'infection' or 'lung'"),
    (["data.num_workers=-1"], "data.num_workers=-1: Input should be greater than or equal to 0"),
    (["data.num_folds=1"], "data.num_folds=1: Input should be greater than or equal to 2"),
    (["data.num_folds=3", "data.fold=5"], "data.fold=5: not one of the 3 folds of data.num_folds (0 to 2)"),
    (["seed=abc"], "seed='abc': Input should be a valid integer"),
    (["trainer.max_time=banana"], "trainer.max_time='banana': expected DD:HH:MM:SS, e.g. 00:01:30:00"),
    (["trainer.max_time=00:00:-1:00"], "trainer.max_time='00:00:-1:00': expected DD:HH:MM:SS"),
    (["trainer.max_time={hours:1}"], "trainer.max_time={'hours': 1}: Input should be a valid string"),
    (["trainer.precision=64x"], "trainer.precision='64x': Input should be 'transformer-engine'"),
    (["trainer.min_epochs=-1"], "trainer.min_epochs=-1: Input should be greater than or equal to 0"),
    (["experiment=best_cpu", "callbacks.progressive_resizing.schedule=[[0,100]]"], "got 100"),
    (["model.net.base_width=0"], "model.net.base_width=0: Input should be greater than or equal to 1"),
    (["+model.net.dropout=0.1"], "model.net.dropout=0.1: Extra inputs are not permitted"),
    (["model=res_unet", "model.net.depth=7"], "model.net.depth=7: Input should be less than or equal to 6"),
    (["model.optimizer.lr=-1"], "model.optimizer.lr=-1: Input should be greater than 0"),
    (["model.optimizer.lr=nan"], "model.optimizer.lr=nan: Input should be a finite number"),
    (["data.synthetic.counts={Train:-3}"], "data.synthetic.counts.Train=-3: Input should be greater than or equal"),
    (["data.synthetic.image_size=100000"], "data.synthetic.image_size=100000: Input should be less than or equal"),
    # settings that would take the machine, train nothing with exit code 0, or crash mid-run
    (["data.num_workers=1000"], "data.num_workers=1000: at most"),
    (["trainer.devices=512"], "trainer.devices=512: this machine has"),
    (["trainer.max_epochs=0"], "trainer.max_epochs=0: Input should be greater than or equal to 1"),
    (["trainer.max_epochs=-1"], "trainer.max_epochs=-1: Input should be greater than or equal to 1"),
    (["trainer.max_epochs=null"], "trainer.max_epochs=None: Input should be a valid integer"),
    (["trainer.limit_val_batches=0"], "trainer.limit_val_batches=0: validates nothing"),
    (
        ["model.loss.dice_weight=0", "model.loss.bce_weight=0"],
        "every loss weight is 0: the network would learn nothing",
    ),
    (["data.targets=[infection,infection]"], "data.targets=['infection', 'infection']: names 'infection' twice"),
    (["train=false", "test=false"], "test=False: with train=false too, the run would do nothing"),
    (["optimized_metric=nope"], "optimized_metric='nope': String should match pattern"),
    (["resume_with_changes=maybe"], "resume_with_changes='maybe': Input should be a valid boolean"),
    (
        ["experiment=quickstart", "model.scheduler.pct_start=2"],
        "model.scheduler: Expected float between 0 and 1 pct_start",
    ),
    (["trainer.limit_train_batches=0"], "trainer.limit_train_batches=0: trains nothing"),
    (["trainer.limit_train_batches=0.0"], "trainer.limit_train_batches=0.0: trains nothing"),
    (["seed=-1"], "seed=-1: Input should be greater than or equal to 0"),
    (["seed=99999999999"], "seed=99999999999: Input should be less than or equal to 4294967295"),
    (["data.seed=-5"], "data.seed=-5: Input should be greater than or equal to 0"),
    (["trainer.precision=64"], "trainer.precision=64: Input should be"),
    (["data.classes=[COVID-19,COVID-19]"], "data.classes=['COVID-19', 'COVID-19']: names 'COVID-19' twice"),
    (["data.eval_classes=[Normal,Normal]"], "data.eval_classes=['Normal', 'Normal']: names 'Normal' twice"),
    (["model.loss.dice_weight=-1"], "model.loss.dice_weight=-1: Input should be greater than or equal to 0"),
    (["+model.loss.smooth=0"], "model.loss.smooth=0: Input should be greater than 0"),
]


@pytest.mark.parametrize(("overrides", "message"), TRAIN_CASES, ids=[" ".join(case[0]) for case in TRAIN_CASES])
def test_bad_training_settings_are_one_line_and_exit_2(
    compose_cfg, overrides: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    from covidseg.core.errors import user_errors
    from covidseg.train import train

    base = [o for o in FAST if not any(o.split("=")[0] == override.split("=")[0] for override in overrides)]
    cfg = compose_cfg("train", [*base, *overrides])
    with pytest.raises(SystemExit) as stopped, user_errors():
        train(cfg)
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error:") and len(error.splitlines()) == 1 and message in error, error
    assert not list(Path(cfg.paths.output_dir).glob("checkpoints/*"))  # no work was done


HYDRA_CASES = [
    ("train", ["trainer.max_epoch=3"], "Could not override 'trainer.max_epoch'. To append to your config use"),
    ("train", ["data.split=["], "no viable alternative at input '['"),
    ("train", ["experiment=nope"], "Could not find 'experiment/nope' Available options in 'experiment': best_cpu"),
    ("train", ["data.batch_size=${oc.env:COVIDSEG_NO_SUCH_VARIABLE}"], "'COVIDSEG_NO_SUCH_VARIABLE' not found"),
    ("train", ["model.optimizer._target_=no_such_module.Adam"], "Error locating target 'no_such_module.Adam'"),
    ("train", ["paths.cache_dir=/proc/covidseg"], "'/proc/covidseg': No such file or directory; choose another"),
    ("train", ["hydra.run.dir=/proc/covidseg"], "'/proc/covidseg': No such file or directory; choose another"),
    ("eval", ["ckpt_path=pretrained", "trheshold=0.5"], "Key 'trheshold' is not in struct"),
    ("calibrate", ["ckpt_path=pretrained", "hydra.run.dir=/proc/covidseg"], "'/proc/covidseg': No such file"),
    ("predict", ["ckpt_path=pretrained", "input=x", "output=y", "output=z,w"], "Ambiguous value for argument"),
    ("export", ["ckpt_path=pretrained", "format=onnx", "+format=onnx"], "Could not append to config"),
    ("distill", ["--config-name=nope", "ckpt_path=pretrained"], "Cannot find primary config 'nope'"),
    ("serve", ["ckpt_path=pretrained", "port=${nope}"], "Interpolation key 'nope' not found"),
]


@pytest.mark.parametrize(("command", "overrides", "message"), HYDRA_CASES, ids=[" ".join(c[1]) for c in HYDRA_CASES])
def test_hydra_s_own_refusals_are_one_line_and_exit_2(
    command: str, overrides: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Hydra prints these over several lines, some as a traceback, with exit code 1; covidseg's
    entry points make them one line and exit code 2 like its own refusals."""
    import importlib

    main = importlib.import_module(f"covidseg.{command}").main
    paths = [f"paths.log_dir={tmp_path / 'outputs'}", f"paths.cache_dir={tmp_path / 'cache'}"]
    paths = [p for p in paths if p.split("=")[0] not in {o.split("=")[0] for o in overrides}]
    data = FAST[:5] if command in {"train", "eval", "calibrate"} else []  # the synthetic data
    assert run_command(main, *data, *overrides, *paths) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error:") and len(error.splitlines()) == 1 and message in error, error
    assert "HYDRA_FULL_ERROR" not in os.environ  # set only while the command runs


@pytest.mark.parametrize(
    ("command", "overrides", "message"),
    [
        ("eval", ["threshold=abc"], "key 'inference.threshold' = 'abc': Input should be a valid number"),
        ("eval", ["presence_threshold=2"], "key 'inference.presence_threshold' = 2: Input should be less than"),
        ("eval", ["flip_tta=maybe"], "key 'inference.flip_tta' = 'maybe': Input should be a valid boolean"),
        ("eval", ["min_region_share=-0.1"], "key 'inference.min_region_share' = -0.1: Input should be greater than"),
        ("eval", ["min_region_share=1"], "key 'inference.min_region_share' = 1: Input should be less than 1"),
        ("eval", ["min_region_share=nan"], "key 'inference.min_region_share' = nan: Input should be less than 1"),
        ("eval", ["data.batch_size=0"], "data.batch_size=0: Input should be greater than or equal to 1"),
        ("calibrate", ["thresholds=[abc]"], "thresholds.0='abc': Input should be a valid number"),
        ("calibrate", ["thresholds=[0.5,1.5]"], "thresholds.1=1.5: Input should be less than 1"),
        ("calibrate", ["thresholds=[]"], "thresholds=[]: List should have at least 1 item"),
        ("calibrate", ["presence_thresholds=[-1]"], "presence_thresholds.0=-1: Input should be greater than or equal"),
        ("calibrate", ["min_region_shares=[0.01,inf]"], "min_region_shares.1=inf: Input should be less than 1"),
        ("calibrate", ["min_region_shares=0.01"], "min_region_shares=0.01: Input should be a valid list"),
        ("calibrate", ["min_healthy_rate=95"], "min_healthy_rate=95: Input should be less than or equal to 1"),
        (
            "calibrate",
            ["+backend=openvino_int8"],
            "backend='openvino_int8': calibrate sweeps the torch Predictor's own",
        ),
        ("predict", ["batch_size=0"], "batch_size=0: Input should be greater than or equal to 1"),
        ("predict", ["save_probability=maybe"], "save_probability='maybe': Input should be a valid boolean"),
        ("predict", ["output="], "output='': expected a path; an empty value would mean the current folder"),
    ],
)
def test_bad_eval_calibration_and_predict_settings_are_one_line_and_exit_2(
    compose_cfg, command: str, overrides: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from covidseg.calibrate import calibrate
    from covidseg.core.errors import user_errors
    from covidseg.eval import evaluate

    data = [o for o in FAST if o.startswith("data") and not o.startswith("data.batch_size")]
    source = [f"input={tmp_path / 'nowhere'}"] if command == "predict" else data
    cfg = compose_cfg(command, ["ckpt_path=pretrained", *source, *overrides])
    with pytest.raises(SystemExit) as stopped, user_errors():
        {"eval": evaluate, "calibrate": calibrate, "predict": predict}[command](cfg)
    error = capsys.readouterr().err.strip()
    assert stopped.value.code == 2 and len(error.splitlines()) == 1 and message in error, error
    written = {path.name for path in Path(cfg.paths.output_dir).glob("*")}
    assert not {"metrics.json", "calibration.json", "predictions.csv"} & written


# --- the tools that read a run's folder and write beside what they read --------------------------


def _run_folder(tmp_path: Path, name: str, files: dict[str, str | bytes | Path | None]) -> Path:
    """Files with their contents; a ``Path`` makes a link to it, ``None`` a FIFO."""
    folder = tmp_path / name
    for relative, content in files.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            os.mkfifo(folder / relative)
        elif isinstance(content, Path):
            (folder / relative).symlink_to(content)
        else:
            (folder / relative).write_bytes(content.encode() if isinstance(content, str) else content)
    return folder


RUN_FOLDER_CASES = [
    ("learning_curves", {"events.out.tfevents.1": "x"}, "has no run_info.json: not a covidseg run folder"),
    ("learning_curves", {"run_info.json": "{"}, "run_info.json' is not a run_info.json covidseg wrote"),
    ("learning_curves", {"run_info.json": "[1]"}, "run_info.json' holds a list, expected names and values"),
    ("learning_curves", {"run_info.json": '{"started": "noon"}'}, "started='noon', expected seconds"),
    ("learning_curves", {"run_info.json": '{"started": 1}'}, "no TensorBoard events under"),
    (
        "learning_curves",
        {"run_info.json": '{"started": 1}', "tb/events.out.tfevents.1": b"\x00garbage" * 9},
        "hold no scalars: empty or damaged",
    ),
    ("kfold_summary", {"0/metrics.json": '{"val/dice": 0.5}'}, "has no multirun.yaml: not the folder of a multirun"),
    ("kfold_summary", {"multirun.yaml": ""}, "no */metrics.json under"),
    ("kfold_summary", {"multirun.yaml": "", "0/metrics.json": "[1, 2"}, "0/metrics.json' is not a metrics.json"),
    ("kfold_summary", {"multirun.yaml": "", "0/metrics.json": "[0.5]"}, "holds a list, expected names and values"),
    ("kfold_summary", {"multirun.yaml": "", "0/metrics.json": '{"val/dice": NaN}'}, "val/dice=nan, expected a finite"),
    ("kfold_summary", {"multirun.yaml": "", "0/metrics.json": '{"val/dice": "0.5"}'}, "val/dice='0.5', expected"),
    ("kfold_summary", {"multirun.yaml": "", "0/metrics.json": "[" * 100_000}, "0/metrics.json' is not a metrics"),
    ("kfold_summary", {"multirun.yaml": "", "0/metrics.json": None}, "0/metrics.json' is not a regular file"),
    ("kfold_summary", {"multirun.yaml": "", "0/metrics.json": Path("/dev/zero")}, "json' is not a regular file (a"),
]


@pytest.mark.parametrize(("tool", "files", "message"), RUN_FOLDER_CASES, ids=[m for *_, m in RUN_FOLDER_CASES])
def test_run_folder_tools_refuse_folders_they_cannot_read_and_write_nothing_there(
    tool: str, files: dict[str, str | bytes | Path | None], message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from covidseg import kfold_summary, learning_curves

    folder = _run_folder(tmp_path, "run", files)
    before = sorted(folder.rglob("*"))
    main = {"learning_curves": learning_curves.main, "kfold_summary": kfold_summary.main}[tool]
    assert run_command(main, str(folder)) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error:") and len(error.splitlines()) == 1 and message in error, error
    assert sorted(folder.rglob("*")) == before


@pytest.mark.parametrize("file_format", ["onnx", "safetensors"])
def test_an_export_never_replaces_a_file(
    file_format: str, compose_cfg, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from covidseg.core.errors import user_errors
    from covidseg.export import export

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "model.json").write_text("a user's notes")
    (theirs / "MODEL_CARD.md").symlink_to(tmp_path / "nowhere")  # a dangling link is taken too
    (tmp_path / "a_file").write_text("a user's file")
    cases = {
        theirs: "already holds model.json, MODEL_CARD.md: an export never replaces files",
        tmp_path / "a_file": "is an existing file; expected a folder",
        tmp_path / "a_file" / "below": "a_file/below' cannot be made: Not a directory",
    }
    for output, message in cases.items():
        with pytest.raises(SystemExit) as stopped, user_errors():
            export(compose_cfg("export", ["ckpt_path=pretrained", f"format={file_format}", f"output={output}"]))
        error = capsys.readouterr().err.strip()
        assert stopped.value.code == 2 and len(error.splitlines()) == 1 and message in error, error
    assert sorted(path.name for path in theirs.iterdir()) == ["MODEL_CARD.md", "model.json"]
    assert (theirs / "model.json").read_text() == "a user's notes" and (
        tmp_path / "a_file"
    ).read_text() == "a user's file"


def test_a_corrupt_onnx_graph_and_odd_messages_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from covidseg.core.errors import ModelFileError, say_error
    from covidseg.inference.segment import onnx_backend

    (tmp_path / "model.onnx").write_bytes(b"\x08\x07 not a graph")
    with pytest.raises(ModelFileError, match="is not an ONNX graph ONNX Runtime can run"):
        onnx_backend(tmp_path / "model.onnx", ["probability"])
    say_error(f"a [bold]name[/] with markup,\na line break and {NOT_UTF8}")
    error = capsys.readouterr().err.strip()
    assert error == "error: a [bold]name[/] with markup, a line break and covid-19_\\udcff\\udcfe.png"


# --- decoding: the type from the content, the size from the header ----------------------------


def test_huge_images_are_refused_from_their_header(tmp_path: Path) -> None:
    """A 100 KB PNG of 10000 x 10000 zeros, and a DICOM header claiming 60000 x 60000 pixels over a
    few bytes of data: both refused before anything of that size is allocated."""
    pytest.importorskip("pydicom")
    from covidseg.core.images import decode_unchanged, read_gray

    png = tmp_path / "bomb.png"
    png.write_bytes(cv2.imencode(".png", np.zeros((10000, 10000), np.uint8))[1].tobytes())
    assert png.stat().st_size < 200_000
    with pytest.raises(DataError, match=r"bomb.png.*10000x10000 = 100,000,000 pixels; at most 50,000,000"):
        read_gray(png)
    with pytest.raises(DataError, match="60000x60000"):
        decode_unchanged(dicom_bytes(np.zeros((4, 4), np.uint8), Rows=60000, Columns=60000), "claims.dcm")
    small, _ = decode_unchanged(dicom_bytes(np.arange(24, dtype=np.uint8).reshape(4, 6)), "small.dcm")
    assert small.shape == (4, 6)


def test_the_type_comes_from_the_content_not_the_name(tmp_path: Path) -> None:
    from covidseg.core.images import image_format, read_gray

    image = np.arange(64 * 48, dtype=np.uint8).reshape(64, 48)
    for name, extension, expected in (("a.png", ".jpg", "JPEG"), ("b.bmp", ".png", "PNG"), ("c.tif", ".bmp", "BMP")):
        path = tmp_path / name
        path.write_bytes(cv2.imencode(extension, image)[1].tobytes())
        assert image_format(path.read_bytes(), name) == (expected, 1)
        assert read_gray(path).shape == (64, 48)
    gif = tmp_path / "d.png"
    gif.write_bytes(b"GIF89a" + b"\0" * 100)
    with pytest.raises(DataError, match="d.png' is not a PNG, JPEG, TIFF, BMP or DICOM image"):
        read_gray(gif)
