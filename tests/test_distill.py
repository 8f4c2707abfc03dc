"""Distillation: the teacher's targets on disk, augmented with the masks, and the student's loss term."""

from __future__ import annotations

import zipfile
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import run_command

from covidseg.core.errors import ConfigError, DataError
from covidseg.data.dataset import XRaySegmentationDataset
from covidseg.data.teacher_targets import load_teacher_targets, save_teacher_targets
from covidseg.distill import write_teacher_targets
from covidseg.inference.loader import load_predictor
from covidseg.train import train
from covidseg.training.settings import check_settings
from tests.conftest import FAST

SYNTHETIC = [o for o in FAST if o.startswith("data.") or o == "data=synthetic"]
ALL_CLASSES = "data.classes=[COVID-19,Non-COVID,Normal]"


def test_soft_targets_move_with_the_masks() -> None:
    """A flip or an affine warp moves the teacher's channel exactly as the mask it was written from."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 32, 32), dtype=np.uint8)
    masks = np.zeros((3, 1, 32, 32), np.uint8)
    masks[:, 0, 4:12, 2:9] = 1  # off-centre, so that a flip shows
    soft = masks[:, 0] * 200
    transform = A.Compose([A.HorizontalFlip(p=1.0), A.Affine(translate_px=(3, 3), rotate=(10, 10), p=1.0)])
    dataset = XRaySegmentationDataset(images, masks, ["a", "b", "c"], transform, seed=1, soft_targets=soft)
    for key in range(3):
        item = dataset[key]
        assert item["teacher"].shape == (1, 32, 32)
        assert not torch.equal(item["mask"][0], torch.from_numpy(masks[key, 0]).float())  # it did move
        torch.testing.assert_close(item["teacher"], item["mask"] * 200 / 255)
    plain = XRaySegmentationDataset(images, masks, ["a", "b", "c"])
    assert "teacher" not in plain[0]
    with pytest.raises(ValueError, match="soft targets"):
        XRaySegmentationDataset(images, masks, ["a", "b", "c"], soft_targets=soft[:2])


def test_distill_writes_the_teachers_probabilities_for_every_training_image(
    trained_checkpoints: list[Path], compose_cfg
) -> None:
    teachers = f"ckpt_path=[{trained_checkpoints[0]},{trained_checkpoints[1]}]"
    cfg = compose_cfg("distill", [teachers, *SYNTHETIC, "flip_tta=true", "bf16=false"])
    path = write_teacher_targets(cfg)
    student = compose_cfg("train", [*FAST, ALL_CLASSES])
    from hydra.utils import instantiate

    training_set = instantiate(student.data).dataset("Train", train=True)
    targets = load_teacher_targets(path, training_set.names, 64)
    assert targets.shape == (len(training_set), 64, 64) and len(training_set) > 8
    # the same numbers as the ensemble itself on the unaugmented images (ungated, with flip TTA)
    loaded = load_predictor([str(c) for c in trained_checkpoints], cfg.paths.log_dir, flip_tta=True)
    images = torch.from_numpy(training_set.images[:4]).unsqueeze(1).float() / 255
    expected = loaded.predictor.predict(images).probability[:, 0].numpy()
    np.testing.assert_allclose(targets[:4] / 255, expected, atol=0.5 / 255 + 1e-6)
    with np.load(path) as stored:
        assert sorted(stored["names"].tolist()) == sorted(training_set.names)


def test_distill_loss_is_bce_against_the_teacher_on_the_segmented_images(compose_cfg) -> None:
    from hydra.utils import instantiate

    cfg = compose_cfg("train", [*FAST, "model.presence_weight=1.0", "model.segment_present_only=true"])
    module = instantiate(cfg.model)
    torch.manual_seed(0)
    masks = torch.zeros(4, 1, 64, 64)
    masks[:2, :, 10:30, 10:30] = 1  # two infected images, two healthy ones
    batch = {
        "image": torch.rand(4, 1, 64, 64),
        "mask": masks,
        "teacher": torch.rand(4, 1, 64, 64),
        "name": list("abcd"),
    }
    module.hparams.distill_weight = 0.0
    plain, logits = module._shared_step(batch, "train")
    module.hparams.distill_weight = 2.5
    distilled, _ = module._shared_step(batch, "train")
    expected = F.binary_cross_entropy_with_logits(logits[:2, 0], batch["teacher"][:2, 0])
    torch.testing.assert_close(distilled - plain, 2.5 * expected)
    validation, _ = module._shared_step(batch, "val")  # validation is scored against the truth only
    torch.testing.assert_close(validation, plain)
    del batch["teacher"]
    with pytest.raises(ValueError, match="data.teacher_targets"):
        module._shared_step(batch, "train")


@pytest.mark.slow
def test_a_student_trains_on_its_teachers_targets(trained_checkpoints: list[Path], compose_cfg, tmp_path: Path) -> None:
    cfg = compose_cfg("distill", [f"ckpt_path={trained_checkpoints[0]}", *SYNTHETIC])
    path = write_teacher_targets(cfg)
    student = compose_cfg(
        "train",
        [*FAST, ALL_CLASSES, "model.presence_weight=1.0", "model.segment_present_only=true",
         f"data.teacher_targets={path}", "model.distill_weight=1.0", "test=false", "logger=csv"],
    )  # fmt: skip
    metrics, _ = train(student)
    assert np.isfinite(metrics["train/loss_epoch"])
    assert (Path(student.paths.output_dir) / "checkpoints" / "last.ckpt").is_file()


def test_distill_weight_without_targets_is_refused(compose_cfg) -> None:
    cfg = compose_cfg("train", [*FAST, "model.distill_weight=1.0"])
    with pytest.raises(ConfigError, match=r"model.distill_weight=1.0 needs data.teacher_targets"):
        check_settings(cfg)
    with pytest.raises(ConfigError, match=r"model.distill_weight=-1.0"):
        check_settings(compose_cfg("train", [*FAST, "model.distill_weight=-1.0"]))


def _write_npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def test_bad_teacher_target_files_are_named(tmp_path: Path) -> None:
    names = ["Train/COVID-19/a.png", "Train/COVID-19/b.png"]
    good = tmp_path / "good.npz"
    save_teacher_targets(good, names, np.full((2, 8, 8), 0.5))
    assert (load_teacher_targets(good, names[::-1], 8) == 128).all()
    probabilities = np.zeros((2, 8, 8), np.uint8)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"PK\x03\x04 not a zip at all")
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, names=np.array([object(), "b"], dtype=object), probabilities=probabilities, version=np.array(1))
    cases = {
        tmp_path / "missing.npz": "is not a readable .npz",
        garbage: "is not a readable .npz",
        pickled: "'names' is object",  # object arrays would need pickle: never loaded
        _write_npz(tmp_path / "keys.npz", names=np.array(names)): r"lacks \['probabilities', 'version'\]",
        _write_npz(
            tmp_path / "version.npz", names=np.array(names), probabilities=probabilities, version=np.array(7)
        ): "format version 7, expected 1",  # fmt: skip
        _write_npz(
            tmp_path / "numbers.npz", names=np.arange(2), probabilities=probabilities, version=np.array(1)
        ): "'names' is int64",  # fmt: skip
        _write_npz(
            tmp_path / "float.npz",
            names=np.array(names),
            probabilities=probabilities.astype(float),
            version=np.array(1),
        ): r"float64 \(2, 8, 8\), expected uint8 \(2, 8, 8\)",  # fmt: skip
        _write_npz(
            tmp_path / "size.npz",
            names=np.array(names),
            probabilities=np.zeros((2, 4, 4), np.uint8),
            version=np.array(1),
        ): r"expected uint8 \(2, 8, 8\)",  # fmt: skip
    }
    bomb = tmp_path / "bomb.npz"  # a few bytes that declare 10 million targets
    with zipfile.ZipFile(bomb, "w") as archive:
        for key, array in {"names": np.array(names), "version": np.array(1)}.items():
            with archive.open(f"{key}.npy", "w") as handle:
                np.lib.format.write_array(handle, array)
        with archive.open("probabilities.npy", "w") as handle:
            header = {"descr": "|u1", "fortran_order": False, "shape": (10_000_000, 8, 8)}
            np.lib.format.write_array_header_1_0(handle, header)
            handle.write(bytes(64))
    cases[bomb] = r"expected uint8 \(2, 8, 8\)"
    huge_names = _write_npz(tmp_path / "names.npz", names=np.array([f"x{i}" for i in range(9)]),
                            probabilities=np.zeros((9, 8, 8), np.uint8), version=np.array(1))  # fmt: skip
    cases[huge_names] = "holds 9 targets for 2 training images: more than 4 per image is refused"
    for path, message in cases.items():
        with pytest.raises(DataError, match=message) as error:
            load_teacher_targets(path, names, 8)
        assert str(path) in str(error.value) and len(str(error.value).splitlines()) == 1
    with pytest.raises(DataError, match=r"no target for 1 training image\(s\), e.g. 'Train/Normal/c.png'"):
        load_teacher_targets(good, [*names, "Train/Normal/c.png"], 8)


def test_distill_command_refuses_a_missing_teacher(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from covidseg.distill import main

    assert run_command(main, "ckpt_path=nope.ckpt", f"paths.log_dir={tmp_path}") == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ckpt_path 'nope.ckpt' does not exist") and len(error.splitlines()) == 1
    assert not list(tmp_path.rglob("*.npz"))
