"""Chest-X-ray-like phantoms in the COVID-QU-Ex layout, so every command runs without a download.

Each phantom has a thorax, two lung fields, ribs, spine, heart shadow and noise; COVID-19 phantoms
carry ground-glass opacities inside the lungs, which form the infection mask.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np

from covidseg.core.errors import DataError
from covidseg.core.files import printable, read_file_bytes
from covidseg.core.labels import CLASSES
from covidseg.core.writing import exclusive_lock
from covidseg.data.index import TARGET_FOLDERS, canonical_split

MARKER = "synthetic.json"
MAX_MARKER_BYTES = 64 << 20  # its settings and one digest per phantom file


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _remove_written(root: Path, files: set[str], folders: set[str]) -> None:
    """Delete exactly the files a generator wrote below ``root`` (its marker last, so an interrupted
    removal can be done again), then those of its folders this leaves empty; anything else stays."""
    for relative in sorted(files - {MARKER}):
        (root / relative).unlink(missing_ok=True)
    for folder in sorted((root / relative for relative in folders), key=lambda path: len(path.parts), reverse=True):
        if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
            folder.rmdir()
    (root / MARKER).unlink(missing_ok=True)


def _files_below(root: Path) -> set[str]:
    """Every file and link below ``root`` (links not followed), relative to it."""
    found = set()
    for folder, folders, names in os.walk(root, followlinks=False):
        links = [name for name in folders if Path(folder, name).is_symlink()]
        found |= {Path(folder, name).relative_to(root).as_posix() for name in [*names, *links]}
    return found


def make_phantom(rng: np.random.Generator, size: int, infected: bool) -> tuple[np.ndarray, ...]:
    """Return ``(image, lung_mask, infection_mask)`` as uint8 arrays (masks 0/255)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    cx = 0.5 + rng.normal(0, 0.02)
    image = np.full((size, size), 0.08, np.float32)

    def ellipse(ex: float, ey: float, rx: float, ry: float) -> np.ndarray:
        return ((x - ex) / rx) ** 2 + ((y - ey) / ry) ** 2 < 1

    thorax = ellipse(cx, 0.55, 0.43 + rng.normal(0, 0.01), 0.5)
    image[thorax] = 0.55
    lung_height = 0.3 + rng.normal(0, 0.015)
    lungs = ellipse(cx - 0.17, 0.48, 0.12 + rng.normal(0, 0.01), lung_height) | ellipse(
        cx + 0.17, 0.48, 0.13 + rng.normal(0, 0.01), lung_height
    )
    heart = ellipse(cx + 0.07, 0.68, 0.13, 0.12)
    lungs &= ~heart
    image[lungs] = 0.2
    image[heart] = 0.62
    image[thorax & (np.abs(x - cx) < 0.035)] = 0.75  # spine
    for rib in range(8):
        rib_y = 0.2 + rib * 0.075 + 0.09 * ((x - cx) / 0.4) ** 2
        image[thorax & (np.abs(y - rib_y) < 0.011)] += 0.16

    infection = np.zeros((size, size), bool)
    if infected:
        opacity = np.zeros((size, size), np.float32)
        lung_y, lung_x = np.nonzero(lungs)
        for _ in range(rng.integers(1, 5)):
            pick = rng.integers(len(lung_y))
            radius = rng.uniform(0.04, 0.1)
            distance = (x - lung_x[pick] / size) ** 2 + (y - lung_y[pick] / size) ** 2
            opacity += np.exp(-distance / (2 * radius**2))
        infection = (opacity > 0.5) & lungs
        image += 0.3 * np.clip(opacity, 0, 1) * lungs
    image = cv2.GaussianBlur(image, (0, 0), sigmaX=size / 200)
    image += rng.normal(0, 0.03, image.shape).astype(np.float32)
    image = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    return image, lungs.astype(np.uint8) * 255, infection.astype(np.uint8) * 255


class SyntheticPhantoms:
    """Writes a reproducible synthetic dataset (same layout as COVID-QU-Ex) into a folder.

    Args:
        counts: images per class for each split, e.g. ``{"Train": 64, "Val": 16, "Test": 16}``.
        classes: class folders to write; only ``COVID-19`` phantoms are infected.
        image_size: side of the written PNGs.
        seed: the same seed writes the same files.
    """

    def __init__(
        self,
        counts: Mapping[str, int],
        classes: Sequence[str] = CLASSES,
        image_size: int = 256,
        seed: int = 0,
    ) -> None:
        self.counts = {canonical_split(split): int(count) for split, count in counts.items()}
        self.classes = list(classes)
        self.image_size = image_size
        self.seed = seed

    def spec(self) -> dict:
        return {"counts": self.counts, "classes": self.classes, "image_size": self.image_size, "seed": self.seed}

    def written_files(self) -> set[str]:
        """Every file this generator writes, relative to its root (the marker included)."""
        return {MARKER} | {
            f"{split}/{label}/{sub}/{label.lower()}_{number:04d}.png"
            for split, count in self.counts.items()
            for label in self.classes
            for sub in ("images", *TARGET_FOLDERS.values())
            for number in range(count)
        }

    def written_folders(self) -> set[str]:
        """Every folder this generator makes below its root, whether or not a file lands in it."""
        return {
            path
            for split in self.counts
            for label in self.classes
            for path in (
                split,
                f"{split}/{label}",
                *(f"{split}/{label}/{sub}" for sub in ("images", *TARGET_FOLDERS.values())),
            )
        }

    def write(self, root: str | Path) -> Path:
        """Write the dataset into ``root`` unless it already holds this exact one.

        ``root`` is replaced only when it is new or empty, or when it holds exactly what a synthetic
        generator wrote there (its marker file says with which settings) and nothing else. The
        folder above ``root`` is locked meanwhile, so runs started at once never write it together.
        """
        root = Path(root)
        root.parent.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(root.parent, wait=True):  # runs started at once: the first writes, the others read
            return self._write_unlocked(root)

    def _write_unlocked(self, root: Path) -> Path:
        marker, previous = root / MARKER, None
        if marker.is_file():
            previous, digests = self._previous(root)
            if previous.spec() == self.spec():
                return root
            if digests is None:
                raise DataError(
                    f"{printable(marker)!r} was written by an older covidseg, without the files' digests: delete "
                    f"{printable(root)!r} to write other phantoms there, or point data.root at a new folder"
                )
            foreign = sorted(_files_below(root) - previous.written_files())
            changed = [  # a file under a phantom's name that is not the phantom the marker recorded
                relative
                for relative in sorted(previous.written_files() - {MARKER})
                if os.path.lexists(root / relative)
                and ((root / relative).is_symlink() or digests.get(relative) != _digest(root / relative))
            ]
            if foreign or changed:
                raise DataError(
                    f"data.root {printable(root)!r} holds {len(foreign + changed)} file(s) the synthetic generator "
                    f"did not write (e.g. {printable((foreign + changed)[0])!r}): move them, or point data.root "
                    "at a new folder"
                )
        elif root.exists() and any(root.iterdir()):
            raise DataError(
                f"data.root {printable(root)!r} is not empty and was not written by the synthetic "
                "generator: point data.root at an empty or new folder"
            )
        staging = Path(tempfile.mkdtemp(prefix=".synthetic-", dir=root.parent))
        try:
            try:
                self._write_files(staging)
            except OSError as error:  # named as the folder the user chose, not the staging one
                raise type(error)(error.errno, error.strerror, str(root)) from None
            if previous is not None:  # every file and folder it made, the empty ones included
                _remove_written(root, previous.written_files(), previous.written_folders())
            root.mkdir(exist_ok=True)
            for child in sorted(staging.iterdir(), key=lambda path: path.name == MARKER):  # the marker last
                child.rename(root / child.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # the folder mkdtemp made for this call (empty on success)
        return root

    @staticmethod
    def _previous(root: Path) -> tuple[SyntheticPhantoms, dict[str, str] | None]:
        """The generator a marker names, and the SHA-256 of each file it wrote (so a file of the
        user's under a phantom's name is never taken for a phantom)."""
        marker = root / MARKER
        try:
            record = json.loads(read_file_bytes(marker, MAX_MARKER_BYTES, "a synthetic-data marker", DataError))
            digests = record.pop("sha256", None)  # None: written by an older covidseg
            if digests is not None and not (
                isinstance(digests, dict) and all(isinstance(v, str) for v in digests.values())
            ):
                raise TypeError("sha256 is not a table of file digests")
            return SyntheticPhantoms(**record), digests
        except (ValueError, TypeError, AttributeError, RecursionError, MemoryError) as error:
            raise DataError(
                f"{printable(marker)!r} is not a synthetic-data marker of this covidseg ({error}): point data.root "
                "at a new folder"
            ) from None

    def _write_files(self, folder: Path) -> None:
        rng = np.random.default_rng(self.seed)
        for split, count in self.counts.items():
            for label in self.classes:
                class_dir = folder / split / label
                for sub in ("images", *TARGET_FOLDERS.values()):
                    (class_dir / sub).mkdir(parents=True)
                for number in range(count):
                    image, lung, infection = make_phantom(rng, self.image_size, label == "COVID-19")
                    name = f"{label.lower()}_{number:04d}.png"
                    files = {"images": image, TARGET_FOLDERS["lung"]: lung, TARGET_FOLDERS["infection"]: infection}
                    for sub, pixels in files.items():  # encoded in memory and written by Python: a full
                        # disk raises (cv2.imwrite only prints libpng's error and leaves an empty file)
                        (class_dir / sub / name).write_bytes(cv2.imencode(".png", pixels)[1].tobytes())
        digests = {relative: _digest(folder / relative) for relative in sorted(self.written_files() - {MARKER})}
        (folder / MARKER).write_text(json.dumps({**self.spec(), "sha256": digests}))
