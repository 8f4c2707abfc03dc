"""Chest-X-ray-like phantoms in the COVID-QU-Ex layout, so every command runs without a download.

Each phantom has a thorax, two lung fields, ribs, spine, heart shadow and noise; COVID-19 phantoms
carry ground-glass opacities inside the lungs, which form the infection mask.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np

from covidseg.data.index import CLASSES, TARGET_FOLDERS, DataError, canonical_split

MARKER = "synthetic.json"


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

    def write(self, root: str | Path) -> Path:
        """Write the dataset into ``root`` unless it already holds this exact one."""
        root = Path(root)
        marker = root / MARKER
        if marker.is_file() and json.loads(marker.read_text()) == self.spec():
            return root
        if root.exists() and any(root.iterdir()) and not marker.is_file():
            raise DataError(
                f"data.root {str(root)!r} is not empty and was not written by the synthetic "
                "generator: point data.root at an empty or new folder"
            )
        root.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".synthetic-", dir=root.parent))
        self._write_files(staging)
        (staging / MARKER).write_text(json.dumps(self.spec()))
        if root.exists():
            shutil.rmtree(root)
        staging.rename(root)
        return root

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
                    cv2.imwrite(str(class_dir / "images" / name), image)
                    cv2.imwrite(str(class_dir / TARGET_FOLDERS["lung"] / name), lung)
                    cv2.imwrite(str(class_dir / TARGET_FOLDERS["infection"] / name), infection)
