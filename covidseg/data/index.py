"""Find the image/mask files of the COVID-QU-Ex "Infection Segmentation Data" layout.

Layout: ``<root>/<split>/<class>/{images, infection masks, lung masks}/<name>.png``.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from covidseg.core.errors import DataError
from covidseg.core.files import printable
from covidseg.core.images import IMAGE_SUFFIXES
from covidseg.core.labels import CLASSES, TARGETS

SPLITS = ("Train", "Val", "Test")
TARGET_FOLDERS = {target: f"{target} masks" for target in TARGETS}  # "infection masks", "lung masks"
DATASET_HELP = (
    "Download COVID-QU-Ex from https://www.kaggle.com/datasets/anasmohammedtahir/covidqu and set "
    "data.root (or the COVIDSEG_DATA variable) to its 'Infection Segmentation Data' folder, "
    "or try every command without a download with data=synthetic."
)


@dataclass(frozen=True)
class Sample:
    """One X-ray with one mask file per requested target, in target order."""

    image: Path
    masks: tuple[Path, ...]
    label: str

    @property
    def name(self) -> str:
        """``<split>/<class>/<file>``: unique across the dataset (k-fold pools two splits)."""
        return printable(f"{self.image.parents[2].name}/{self.label}/{self.image.name}")


def canonical_split(split: str) -> str:
    """Map ``train``/``VAL``/... onto the dataset's folder names."""
    for known in SPLITS:
        if split.lower() == known.lower():
            return known
    raise DataError(f"data.split={split!r} is not one of {', '.join(SPLITS)}")


def find_split_root(root: str | Path) -> Path:
    """Return the folder holding the split folders: ``root`` itself or a folder up to two below.

    A Kaggle download nests ``Infection Segmentation Data/Infection Segmentation Data/``.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root {str(root)!r} does not exist or is not a folder. {DATASET_HELP}")
    candidates = [root, *sorted(root.glob("*")), *sorted(root.glob("*/*"))]
    for folder in candidates:
        if folder.is_dir() and any((folder / split).is_dir() for split in SPLITS):
            return folder
    raise DataError(f"no Train/Val/Test folder found in {str(root)!r} or two levels below it. {DATASET_HELP}")


def _image_files(folder: Path) -> dict[str, Path]:
    """The images of ``folder`` by name; anything named like an image that is not a regular file
    (a FIFO, a device, a folder, a link to nothing) is refused by its name, never skipped."""
    with os.scandir(folder) as entries:  # names sorted as text, types from the listing: linear in the files
        named_like_images = sorted(
            (entry for entry in entries if os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES),
            key=lambda entry: entry.name,
        )
    for entry in named_like_images:
        if not entry.is_file():  # follows a link, as a stat would
            kind = "a link to nothing" if not os.path.exists(entry.path) else "a folder, pipe, socket or device"
            raise DataError(f"{printable(entry.path)!r} is {kind}, not an image file: replace or remove it")
    return {os.path.splitext(entry.name)[0]: folder / entry.name for entry in named_like_images}


def index_split(
    root: str | Path,
    split: str,
    classes: Sequence[str] = ("COVID-19",),
    targets: Sequence[str] = ("infection",),
) -> list[Sample]:
    """List the samples of one split, checking that every image has each of its masks."""
    with _collector_paused():
        return _index_split(root, split, classes, targets)


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cycle collector rescans every live object as the lists grow, which doubled the time
    per image from 10k to 100k images (``covidseg.benchmarks.data_scaling``); indexing makes no cycles."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _index_split(root: str | Path, split: str, classes: Sequence[str], targets: Sequence[str]) -> list[Sample]:
    split_dir = find_split_root(root) / canonical_split(split)
    if not split_dir.is_dir():
        raise DataError(f"split folder {str(split_dir)!r} is missing")
    unknown = [target for target in targets if target not in TARGET_FOLDERS]
    if unknown or not targets:
        raise DataError(f"data.targets={list(targets)} must be a non-empty subset of {list(TARGET_FOLDERS)}")
    if not classes:
        raise DataError("data.classes is empty: name at least one of " + ", ".join(CLASSES))
    samples: list[Sample] = []
    for label in classes:
        class_dir = split_dir / label
        if not class_dir.is_dir():
            present = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
            raise DataError(f"class folder {str(class_dir)!r} is missing (found: {present})")
        image_dir = class_dir / "images"
        if not image_dir.is_dir():
            raise DataError(f"image folder {str(image_dir)!r} is missing")
        images = _image_files(image_dir)
        mask_sets = []
        for target in targets:
            mask_dir = class_dir / TARGET_FOLDERS[target]
            if not mask_dir.is_dir():
                raise DataError(f"mask folder {str(mask_dir)!r} is missing")
            masks = _image_files(mask_dir)
            _check_pairs(images, masks, image_dir, mask_dir)
            mask_sets.append(masks)
        samples += [
            Sample(image=path, masks=tuple(masks[stem] for masks in mask_sets), label=label)
            for stem, path in images.items()
        ]
    if not samples:
        raise DataError(f"split {str(split_dir)!r} has no images for classes {list(classes)}")
    return samples


def _check_pairs(images: dict[str, Path], masks: dict[str, Path], image_dir: Path, mask_dir: Path) -> None:
    def listing(names: set[str]) -> str:
        shown = sorted(names)[:10]
        return ", ".join(shown) + (f" and {len(names) - 10} more" if len(names) > 10 else "")

    without_mask = set(images) - set(masks)
    if without_mask:
        raise DataError(
            f"{len(without_mask)} image(s) in {str(image_dir)!r} have no mask in "
            f"{str(mask_dir)!r}: {listing(without_mask)}"
        )
    without_image = set(masks) - set(images)
    if without_image:
        raise DataError(
            f"{len(without_image)} mask(s) in {str(mask_dir)!r} have no image in "
            f"{str(image_dir)!r}: {listing(without_image)}"
        )
