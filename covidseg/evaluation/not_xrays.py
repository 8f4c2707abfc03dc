"""Pictures that are not chest X-rays: what the x-ray check is measured and tested on.

Drawn on the spot (:func:`generated_pictures`): documents, forms, drawings, noise, gradients, textures,
scenes and a CT/MRI-like head phantom, 8-bit grayscale at sizes a user might upload, made by NumPy and
OpenCV from a seed. Shipped by installed packages (:func:`packaged_pictures`): Matplotlib's sample
pictures (a portrait photograph, a head MRI slice, a logo, a rendered object; Matplotlib is a
dependency, so every install has them), and where installed scikit-learn's two sample photographs and
scikit-image's sample pictures. Nothing is downloaded, so the measurement is the same on every
machine with the same packages.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import logging
import zlib
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from covidseg.core.errors import DataError
from covidseg.core.files import read_file_bytes
from covidseg.core.images import read_gray, to_gray

Rng = np.random.Generator
log = logging.getLogger(__name__)
MRI_BYTES = 256 * 256 * 2  # Matplotlib's s1045.ima: one 256 x 256 slice, 16-bit little-endian


def _document(rng: Rng) -> np.ndarray:
    page = np.full((1100, 850), 245, np.uint8)
    for line in range(40):
        words = " ".join("".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 9))) for _ in range(8))
        cv2.putText(page, words, (60, 70 + line * 25), cv2.FONT_HERSHEY_SIMPLEX, 0.6, 25, 1, cv2.LINE_AA)
    return page


def _form(rng: Rng) -> np.ndarray:
    page = np.full((800, 1000), 255, np.uint8)
    for row in range(0, 800, 50):
        cv2.line(page, (40, row), (960, row), 60, 2)
    for column in (40, 300, 620, 960):
        cv2.line(page, (column, 0), (column, 800), 60, 2)
    for row in range(25, 800, 50):
        cv2.putText(page, f"item {int(rng.integers(1000))}", (60, row + 10), cv2.FONT_HERSHEY_SIMPLEX, 0.7, 0, 2)
    return page


def _drawing(rng: Rng) -> np.ndarray:
    canvas = np.full((600, 800), 255, np.uint8)
    for _ in range(12):
        centre = (int(rng.integers(50, 750)), int(rng.integers(50, 550)))
        cv2.circle(canvas, centre, int(rng.integers(15, 120)), int(rng.integers(0, 120)), int(rng.integers(1, 6)))
        corner = (int(rng.integers(0, 700)), int(rng.integers(0, 500)))
        cv2.rectangle(canvas, corner, (corner[0] + 90, corner[1] + 60), int(rng.integers(0, 200)), 3)
    return canvas


def _face(rng: Rng) -> np.ndarray:
    canvas = np.full((512, 512), 230, np.uint8)
    cv2.circle(canvas, (256, 256), 180, 170, -1)
    for x in (190, 322):
        cv2.circle(canvas, (x, 210), 25, 40, -1)
    cv2.ellipse(canvas, (256, 320), (90, 45), 0, 0, 180, 40, 8)
    return canvas


def _head_slice(rng: Rng) -> np.ndarray:
    """A cross-sectional head phantom (Shepp-Logan-like ellipses): CT or MRI, not a chest X-ray."""
    canvas = np.zeros((512, 512), np.float32)
    cv2.ellipse(canvas, (256, 256), (180, 230), 0, 0, 360, 1.0, -1)
    cv2.ellipse(canvas, (256, 262), (165, 212), 0, 0, 360, 0.25, -1)
    for centre, axes, angle, value in (((200, 240), (30, 80), 18, 0.05), ((312, 240), (40, 100), -18, 0.05),
                                       ((256, 150), (20, 20), 0, 0.45), ((256, 360), (12, 10), 0, 0.4)):  # fmt: skip
        cv2.ellipse(canvas, centre, axes, angle, 0, 360, value, -1)
    canvas += rng.normal(0, 0.02, canvas.shape).astype(np.float32)
    return np.clip(canvas * 230, 0, 255).astype(np.uint8)


def _smooth_noise(rng: Rng, sigma: float) -> np.ndarray:
    field = cv2.GaussianBlur(rng.normal(0, 1, (512, 512)).astype(np.float32), (0, 0), sigma)
    return cv2.normalize(field, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)


def _scene(rng: Rng) -> np.ndarray:
    """A photograph-like scene: sky, horizon, ground, objects, blur and sensor noise."""
    sky = np.linspace(200, 150, 240)[:, None].repeat(640, 1)
    ground = np.linspace(90, 50, 240)[:, None].repeat(640, 1)
    scene = np.concatenate([sky, ground]).astype(np.float32)
    for _ in range(8):
        centre = (int(rng.integers(0, 640)), int(rng.integers(180, 460)))
        cv2.ellipse(scene, centre, (int(rng.integers(10, 60)), int(rng.integers(20, 90))), 0, 0, 360,
                    float(rng.integers(20, 230)), -1)  # fmt: skip
    scene = cv2.GaussianBlur(scene, (0, 0), 2) + rng.normal(0, 6, scene.shape)
    return np.clip(scene, 0, 255).astype(np.uint8)


PICTURES: dict[str, Callable[[Rng], np.ndarray]] = {
    "document": _document,
    "form": _form,
    "drawing": _drawing,
    "face_drawing": _face,
    "head_slice": _head_slice,
    "scene": _scene,
    "uniform_noise": lambda rng: rng.integers(0, 256, (512, 512), dtype=np.uint8),
    "gaussian_noise": lambda rng: np.clip(rng.normal(128, 40, (512, 512)), 0, 255).astype(np.uint8),
    "cloudy_noise": lambda rng: _smooth_noise(rng, 12),
    "fine_texture": lambda rng: _smooth_noise(rng, 1.5),
    "horizontal_gradient": lambda rng: np.tile(np.linspace(0, 255, 512), (512, 1)).astype(np.uint8),
    "radial_gradient": lambda rng: (255 - np.hypot(*np.mgrid[-256:256, -256:256]) / 362 * 255).astype(np.uint8),
    "checkerboard": lambda rng: ((np.add.outer(np.arange(512) // 32, np.arange(512) // 32) % 2) * 255).astype(np.uint8),
    "stripes": lambda rng: ((np.arange(512) // 16 % 2) * 200 + 30).astype(np.uint8)[None].repeat(512, 0),
    "blocks": lambda rng: np.kron(rng.integers(0, 2, (25, 25), dtype=np.uint8) * 255, np.ones((20, 20), np.uint8)),
}  # fmt: skip


def generated_pictures(seed: int = 0) -> dict[str, np.ndarray]:
    """Every picture of :data:`PICTURES`, drawn from ``seed``."""
    return {name: draw(np.random.default_rng([seed, index])) for index, (name, draw) in enumerate(PICTURES.items())}


def _rgb_gray(picture: np.ndarray) -> np.ndarray:
    """An RGB(A) or single-channel array as 8-bit gray (:func:`to_gray` reads OpenCV's BGR order)."""
    picture = np.asarray(picture)
    return to_gray(np.ascontiguousarray(picture[..., 2::-1]) if picture.ndim == 3 else picture)


def _mri_slice(path: Path) -> np.ndarray:
    packed = read_file_bytes(path, 2 * MRI_BYTES, "a gzip'd MRI slice", DataError)
    with gzip.GzipFile(fileobj=io.BytesIO(packed)) as raw:
        data = raw.read(MRI_BYTES + 1)
    if len(data) != MRI_BYTES:
        raise ValueError(f"holds {len(data)} bytes, expected {MRI_BYTES}")
    return to_gray(np.frombuffer(data, "<u2").reshape(256, 256))


def _matplotlib_pictures() -> dict[str, np.ndarray]:
    """Matplotlib's sample pictures; one that is missing or damaged is left out with a warning (the
    measurement lists the pictures it scored)."""
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "sample_data"
    pictures = {}
    for name, file, read in (("grace_hopper", "grace_hopper.jpg", read_gray), ("logo", "logo2.png", read_gray),
                             ("present", "Minduka_Present_Blue_Pack.png", read_gray),
                             ("head_mri", "s1045.ima.gz", _mri_slice)):  # fmt: skip
        try:
            pictures[f"matplotlib_{name}"] = read(folder / file)
        except (DataError, OSError, EOFError, ValueError, zlib.error) as error:  # BadGzipFile is an OSError
            log.warning("left out Matplotlib's sample picture %s: %s", folder / file, error)
    return pictures


def packaged_pictures() -> dict[str, np.ndarray]:
    """Sample pictures that installed packages ship, in 8-bit gray (see the module's docstring). Each
    photograph once: scikit-image's ``cat`` is its ``chelsea``, so only ``chelsea`` is here."""
    pictures = _matplotlib_pictures()
    if importlib.util.find_spec("sklearn") is not None:
        from sklearn.datasets import load_sample_images

        for name, picture in zip(("china", "flower"), load_sample_images().images, strict=True):
            pictures[f"sklearn_{name}"] = _rgb_gray(picture)
    if importlib.util.find_spec("skimage") is not None:
        import skimage.data

        for name in ("astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "colorwheel",
                     "grass", "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "logo", "microaneurysms",
                     "moon", "page", "retina", "rocket", "shepp_logan_phantom", "text"):  # fmt: skip
            pictures[f"skimage_{name}"] = _rgb_gray(getattr(skimage.data, name)())
    return pictures
