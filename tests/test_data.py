import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from covidseg.core.errors import DataError
from covidseg.data import CovidQuExDataModule, SyntheticPhantoms
from covidseg.data.decode import decode_samples
from covidseg.data.index import find_split_root, index_split


@pytest.fixture
def dataset_root(tmp_path: Path) -> Path:
    """A small synthetic copy that each test may damage."""
    return SyntheticPhantoms({"Train": 4, "Val": 2}, image_size=32, seed=1).write(tmp_path / "data")


def test_synthetic_is_reproducible_and_has_the_dataset_layout(tmp_path: Path) -> None:
    first = SyntheticPhantoms({"Train": 3}, image_size=32, seed=5).write(tmp_path / "a")
    second = SyntheticPhantoms({"Train": 3}, image_size=32, seed=5).write(tmp_path / "b")
    files = sorted(p.relative_to(first) for p in first.rglob("*.png"))
    assert len(files) == 3 * 3 * 3  # classes x (image, infection, lung) x count
    for relative in files:
        assert (first / relative).read_bytes() == (second / relative).read_bytes()
    covid = [cv2.imread(str(p), 0) for p in (first / "Train/COVID-19/infection masks").glob("*.png")]
    normal = [cv2.imread(str(p), 0) for p in (first / "Train/Normal/infection masks").glob("*.png")]
    assert all(mask.any() for mask in covid) and not any(mask.any() for mask in normal)


def test_infection_lies_inside_the_lungs(dataset_root: Path) -> None:
    samples = index_split(dataset_root, "Train", ["COVID-19"], ["infection", "lung"])
    _, masks = decode_samples(samples, 32)
    infection, lung = masks[:, 0].astype(bool), masks[:, 1].astype(bool)
    assert infection.any() and not (infection & ~lung).any()


def test_synthetic_refuses_to_overwrite_foreign_data(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("precious")
    with pytest.raises(DataError, match="not empty"):
        SyntheticPhantoms({"Train": 1}).write(tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "precious"


@pytest.mark.parametrize("levels", [0, 1, 2])
def test_root_may_be_up_to_two_levels_above_the_splits(dataset_root: Path, tmp_path: Path, levels: int) -> None:
    parent = tmp_path / "outer"
    nested = parent / "Infection Segmentation Data" / "Infection Segmentation Data"
    nested.parent.mkdir(parents=True)
    shutil.copytree(dataset_root, nested)
    root = [nested, nested.parent, parent][levels]
    assert find_split_root(root) == nested
    assert len(index_split(root, "train")) == 4


def test_index_selects_classes_and_targets(dataset_root: Path) -> None:
    samples = index_split(dataset_root, "VAL", ["COVID-19", "Normal"], ["lung", "infection"])
    assert len(samples) == 4
    assert {s.label for s in samples} == {"COVID-19", "Normal"}
    assert [m.parent.name for m in samples[0].masks] == ["lung masks", "infection masks"]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda root: shutil.rmtree(root / "Val"), "split folder .*Val.* is missing"),
        (
            lambda root: (root / "Train/COVID-19/infection masks/covid-19_0001.png").unlink(),
            "have no mask.*covid-19_0001",
        ),
        (lambda root: (root / "Train/COVID-19/images/covid-19_0002.png").unlink(), "have no image.*covid-19_0002"),
        (lambda root: shutil.rmtree(root / "Train/COVID-19"), "class folder .*COVID-19.* is missing"),
    ],
)
def test_index_errors_name_the_problem(dataset_root: Path, damage, message: str) -> None:
    damage(dataset_root)
    split = "Val" if "split" in message else "Train"
    with pytest.raises(DataError, match=message):
        index_split(dataset_root, split)


def test_missing_root_explains_how_to_get_data(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist.*data=synthetic"):
        index_split(tmp_path / "nowhere", "Train")
    with pytest.raises(DataError, match="no Train/Val/Test folder"):
        index_split(tmp_path, "Train")


def test_unknown_split_class_filter_and_target_are_refused(dataset_root: Path) -> None:
    with pytest.raises(DataError, match="data.split='Dev'"):
        index_split(dataset_root, "Dev")
    with pytest.raises(DataError, match="data.classes is empty"):
        index_split(dataset_root, "Train", [])
    with pytest.raises(DataError, match="data.targets"):
        index_split(dataset_root, "Train", ["COVID-19"], ["heart"])


def test_empty_split_is_refused(dataset_root: Path) -> None:
    for folder in (dataset_root / "Val/Normal").iterdir():
        shutil.rmtree(folder)
        folder.mkdir()
    with pytest.raises(DataError, match="has no images"):
        index_split(dataset_root, "Val", ["Normal"])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty"),
        (b"not a png at all", "is not a PNG, JPEG, TIFF, BMP or DICOM image"),
        ("truncate", "could not be decoded"),
    ],
)
def test_unreadable_images_are_named(dataset_root: Path, content, message: str) -> None:
    path = dataset_root / "Train/COVID-19/images/covid-19_0003.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3] if content == "truncate" else content)
    samples = index_split(dataset_root, "Train")
    with pytest.raises(DataError, match=f"covid-19_0003.png.*{message}"):
        decode_samples(samples, 32)


def test_mask_of_another_size_is_refused(dataset_root: Path) -> None:
    cv2.imwrite(str(dataset_root / "Train/COVID-19/infection masks/covid-19_0000.png"), np.zeros((16, 16), np.uint8))
    with pytest.raises(DataError, match="covid-19_0000.png.* is 16x16 but its image .* is 32x32"):
        decode_samples(index_split(dataset_root, "Train"), 32)


def test_rgb_and_16bit_images_are_converted_and_masks_follow_one_rule(dataset_root: Path) -> None:
    folder = dataset_root / "Train/COVID-19"
    gray = cv2.imread(str(folder / "images/covid-19_0000.png"), 0)
    cv2.imwrite(str(folder / "images/covid-19_0000.png"), cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR))
    cv2.imwrite(str(folder / "images/covid-19_0001.png"), gray.astype(np.uint16) * 257)
    truth = cv2.imread(str(folder / "infection masks/covid-19_0002.png"), 0) > 0
    assert truth.any()
    cv2.imwrite(str(folder / "infection masks/covid-19_0002.png"), truth.astype(np.uint8))  # 0/1
    gray_as_rgb = cv2.cvtColor(truth.astype(np.uint8) * 255, cv2.COLOR_GRAY2BGR)
    cv2.imwrite(str(folder / "infection masks/covid-19_0003.png"), gray_as_rgb)
    images, masks = decode_samples(index_split(dataset_root, "Train"), 32)
    assert images.dtype == np.uint8 and images.shape == (4, 32, 32)
    assert np.array_equal(images[0], gray)
    stretched = (gray.astype(float) - gray.min()) / (gray.max() - gray.min()) * 255  # 16-bit: min-max
    assert np.abs(images[1] - stretched).max() <= 1
    assert np.array_equal(masks[2, 0], truth) and np.array_equal(masks[3, 0], truth)


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (np.dstack([np.zeros((32, 32), np.uint8), np.full((32, 32), 200, np.uint8), np.zeros((32, 32), np.uint8)]),
         "is in colour; expected a single-channel mask"),
        (np.tile(np.array([0, 100, 200], np.uint8), (32, 11))[:, :32], "has the values 0, 100, 200; expected 0"),
        (np.tile(np.array([1, 255], np.uint8), (32, 16)), "has the values 1, 255; expected 0"),
    ],
)  # fmt: skip
def test_masks_that_fit_no_rule_are_refused_never_emptied(dataset_root: Path, mask: np.ndarray, message: str) -> None:
    cv2.imwrite(str(dataset_root / "Train/COVID-19/infection masks/covid-19_0001.png"), mask)
    with pytest.raises(DataError, match=f"covid-19_0001.png' {message}"):
        decode_samples(index_split(dataset_root, "Train"), 32)


def test_decode_resizes_with_nearest_masks(dataset_root: Path) -> None:
    images, masks = decode_samples(index_split(dataset_root, "Train", targets=["infection", "lung"]), 16)
    assert images.shape == (4, 16, 16) and masks.shape == (4, 2, 16, 16)
    assert set(np.unique(masks)) <= {0, 1}


def test_cache_is_reused_and_invalidated_by_a_changed_file(dataset_root: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    samples = index_split(dataset_root, "Train")
    first, _ = decode_samples(samples, 32, cache)
    assert len(list(cache.glob("*-images.npy"))) == 1
    path = samples[0].image
    cv2.imwrite(str(path), np.full((32, 32), 7, np.uint8))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    second, _ = decode_samples(samples, 32, cache)
    assert len(list(cache.glob("*-images.npy"))) == 2
    assert (second[0] == 7).all() and not (first[0] == 7).all()
    again, _ = decode_samples(samples, 32, cache)
    assert np.array_equal(again, second)


def test_a_full_disk_while_the_cache_is_built_leaves_no_file_and_still_decodes(
    dataset_root: Path, tmp_path: Path, monkeypatch, caplog
) -> None:
    import errno

    from covidseg.data import decode

    samples = index_split(dataset_root, "Train", targets=["infection", "lung"])
    expected = decode_samples(samples, 32)  # no cache: the arrays decoded in memory

    def disk_full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(decode.os, "posix_fallocate", disk_full)
    cache = tmp_path / "cache"
    images, masks = decode_samples(samples, 32, cache)
    assert np.array_equal(images, expected[0]) and np.array_equal(masks, expected[1])
    assert "could not write the decode cache" in caplog.text and "No space left" in caplog.text
    left = [path.name for path in cache.iterdir()]
    assert not any(name.endswith((".npy", ".json")) or ".tmp" in name for name in left), left  # no part of an entry


def test_datamodule_batches_and_augments_only_training(dataset_root: Path) -> None:
    import albumentations as A

    datamodule = CovidQuExDataModule(
        dataset_root, image_size=32, batch_size=2, split="val", train_transform=A.HorizontalFlip(p=1.0)
    )
    datamodule.setup("fit")
    batch = next(iter(datamodule.val_dataloader()))
    assert batch["image"].shape == (2, 1, 32, 32) and batch["mask"].shape == (2, 1, 32, 32)
    assert batch["image"].min() >= 0 and batch["image"].max() <= 1
    train_set, val_set = datamodule.dataset("Train", train=True), datamodule.dataset("Train")
    assert (train_set[0]["image"].flip(-1) == val_set[0]["image"]).all()
    assert (train_set[0]["mask"].flip(-1) == val_set[0]["mask"]).all()
    assert datamodule.has_split("Val") and not datamodule.has_split("Test")


def test_real_data_subset_indexes_and_decodes(real_data: Path) -> None:
    samples = index_split(real_data, "Val", ["COVID-19", "Normal"], ["infection", "lung"])
    assert len(samples) == 466 + 233
    subset = samples[:3] + samples[-3:]
    images, masks = decode_samples(subset, 256)
    assert images.shape == (6, 256, 256) and masks.shape == (6, 2, 256, 256)
    assert masks[:3, 0].any(axis=(1, 2)).all(), "every COVID-19 infection mask is non-empty"
    assert not masks[3:, 0].any(), "Normal images have empty infection masks"
    assert not (masks[:, 0].astype(bool) & ~masks[:, 1].astype(bool)).any()


def test_a_cache_entry_is_mapped_read_only_and_built_once_by_processes_at_once(dataset_root, tmp_path, monkeypatch):
    import threading
    import warnings

    import covidseg.data.decode as decode
    from covidseg.data.dataset import XRaySegmentationDataset

    samples = index_split(dataset_root, "Train")
    built: list[int] = []
    real_decode_all = decode._decode_all

    def slow_decode_all(*args, **kwargs):
        built.append(1)
        threading.Event().wait(0.3)  # long enough for the other one to arrive while this builds
        return real_decode_all(*args, **kwargs)

    monkeypatch.setattr(decode, "_decode_all", slow_decode_all)
    results: list = []
    workers = [threading.Thread(target=lambda: results.append(decode_samples(samples, 32, tmp_path / "cache")))
               for _ in range(2)]  # fmt: skip
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert len(built) == 1  # the second waited on the lock, then mapped what the first wrote
    assert all(isinstance(images, np.memmap) for images, _ in results)  # the builder too: its copy is freed
    images, masks = decode_samples(samples, 32, tmp_path / "cache")
    assert isinstance(images, np.memmap) and not images.flags.writeable
    np.testing.assert_array_equal(images, results[0][0])
    with warnings.catch_warnings():  # torch warns when it wraps a read-only array: each item is a copy
        warnings.simplefilter("error")
        XRaySegmentationDataset(images, masks, [sample.name for sample in samples])[0]["image"].add_(1)
