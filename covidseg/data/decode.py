"""Decode every X-ray and mask once into uint8 arrays, with an optional on-disk ``.npy`` cache.

Training then indexes arrays in memory: no PNG is decoded per step. Files are read as bytes and
decoded with ``cv2.imdecode``: OpenCV never sees a file name, so no name (any bytes, not UTF-8)
can crash native code.

Masks: a single-channel image with at most two values, 0 and one foreground value (0/1 and
0/255 both work); anything else (colour, several grey levels) is refused with the file named.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from covidseg.data.index import DataError, Sample, printable

log = logging.getLogger(__name__)


def read_dicom(path: Path) -> np.ndarray:
    """Pixel data of a DICOM file (needs the ``dicom`` extra), with MONOCHROME1 inverted."""
    try:
        import pydicom
    except ImportError as error:
        raise DataError(f"{str(path)!r} is DICOM: install the extra with pip install -e '.[dicom]'") from error
    try:
        dataset = pydicom.dcmread(path)
        pixels = dataset.pixel_array.astype(np.float32)
    except Exception as error:  # pydicom raises many kinds for corrupt files
        raise DataError(f"{str(path)!r} could not be read as DICOM: {error}") from error
    if pixels.ndim == 3:  # colour or multi-frame: take the mean over channels / first frame
        pixels = pixels.mean(axis=-1) if pixels.shape[-1] in (3, 4) else pixels[0]
    if getattr(dataset, "PhotometricInterpretation", "") == "MONOCHROME1":
        pixels = pixels.max() - pixels
    return pixels


def read_unchanged(path: Path) -> np.ndarray:
    """Decode an image file as stored (channels and bit depth kept), from its bytes."""
    data = np.fromfile(path, dtype=np.uint8)
    if data.size == 0:
        raise DataError(f"{str(path)!r} is empty (0 bytes): replace or remove the file")
    image = read_dicom(path) if path.suffix.lower() == ".dcm" else cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise DataError(f"{str(path)!r} could not be decoded as an image: the file is corrupt or truncated")
    return image


def read_gray(path: Path) -> np.ndarray:
    """Read any image OpenCV reads, or DICOM, as 8-bit grayscale (RGB and 16-bit are converted)."""
    image = read_unchanged(path)
    if image.ndim == 3:
        code = cv2.COLOR_BGRA2GRAY if image.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        image = cv2.cvtColor(image, code)
    if image.dtype != np.uint8:
        image = cv2.normalize(image.astype(np.float32), None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    return image


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Area interpolation keeps thin structures when shrinking an X-ray."""
    if image.shape == (size, size):
        return image
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)


def read_mask(path: Path) -> np.ndarray:
    """A mask as {0, 1} uint8: foreground is every value above 0 of a two-level, single-channel image."""
    mask = read_unchanged(path)
    if mask.ndim == 3:
        colour = mask[..., :3]
        if not (np.array_equal(colour[..., 0], colour[..., 1]) and np.array_equal(colour[..., 0], colour[..., 2])):
            raise DataError(
                f"mask {str(path)!r} is in colour; expected a single-channel mask with 0 as background "
                "and one foreground value (e.g. 0/255 or 0/1)"
            )
        mask = colour[..., 0]
    levels = np.unique(mask)
    if len(levels) > 2 or (len(levels) == 2 and levels[0] != 0):
        shown = ", ".join(str(v) for v in levels[:5]) + (", ..." if len(levels) > 5 else "")
        raise DataError(
            f"mask {str(path)!r} has the values {shown}; expected 0 as background and one foreground "
            "value (e.g. 0/255 or 0/1)"
        )
    return (mask > 0).astype(np.uint8)


def _decode_sample(sample: Sample, size: int) -> tuple[np.ndarray, np.ndarray]:
    image = read_gray(sample.image)
    masks = []
    for mask_path in sample.masks:
        mask = read_mask(mask_path)
        if mask.shape != image.shape:
            raise DataError(
                f"mask {str(mask_path)!r} is {mask.shape[1]}x{mask.shape[0]} but its image "
                f"{str(sample.image)!r} is {image.shape[1]}x{image.shape[0]}"
            )
        masks.append(cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST))
    return resize_image(image, size), np.stack(masks)


def _cache_key(samples: Sequence[Sample], size: int) -> str:
    digest = hashlib.sha1(str(size).encode())
    for sample in samples:
        for path in (sample.image, *sample.masks):
            stat = path.stat()
            digest.update(os.fsencode(path) + f"|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def decode_samples(
    samples: Sequence[Sample], image_size: int, cache_dir: str | Path | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Return images ``(N, S, S)`` and masks ``(N, T, S, S)`` as uint8 (masks in {0, 1}).

    With ``cache_dir``, the arrays are stored as ``.npy`` files keyed by the file list (as bytes),
    sizes and modification times, so a changed or added file invalidates the cache; a damaged
    entry is rebuilt.
    """
    cache_files = None
    if cache_dir is not None:
        key = _cache_key(samples, image_size)
        cache_files = (Path(cache_dir) / f"{key}-images.npy", Path(cache_dir) / f"{key}-masks.npy")
        cached = _load_cache(cache_files)
        if cached is not None:
            return cached
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        decoded = list(pool.map(lambda s: _decode_sample(s, image_size), samples))
    images = np.stack([image for image, _ in decoded])
    masks = np.stack([mask for _, mask in decoded])
    if cache_files is not None:
        _save_atomic(cache_files, (images, masks), samples, image_size)
    return images, masks


def _describe(array: np.ndarray) -> dict:
    """What a cache entry must match when it is loaded again."""
    return {"shape": list(array.shape), "dtype": array.dtype.str, "crc32": zlib.crc32(array.tobytes())}


def _meta_path(paths: tuple[Path, Path]) -> Path:
    return paths[0].with_name(paths[0].name.replace("-images.npy", ".json"))


def _load_cache(paths: tuple[Path, Path]) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached arrays when present and intact (shape, dtype and checksum as recorded); a damaged
    or unverifiable entry is reported in one line and rebuilt."""
    if not any(path.exists() for path in paths):
        return None
    try:
        expected = json.loads(_meta_path(paths).read_text())
        arrays = tuple(np.load(path, allow_pickle=False) for path in paths)
        for name, array in zip(("images", "masks"), arrays, strict=True):
            if name not in expected:
                raise ValueError(f"no recorded shape, type and checksum for the {name}")
            if _describe(array) != expected[name]:
                raise ValueError(f"the {name} do not match their recorded shape, type and checksum")
    except (OSError, ValueError, TypeError, EOFError) as error:
        log.warning("decode cache %s is damaged (%s): rebuilding it", printable(paths[0].parent), error)
        return None
    return arrays


def _save_atomic(paths: tuple[Path, Path], arrays: tuple[np.ndarray, ...], samples, size: int) -> None:
    """Write the cache through temporary files so an interrupted write leaves no half cache; the
    metadata (written last) records what :func:`_load_cache` checks."""
    try:
        paths[0].parent.mkdir(parents=True, exist_ok=True)
        for path, array in zip(paths, arrays, strict=True):
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, array)
            os.replace(tmp, path)
        meta = {"image_size": size, "count": len(samples), "first": printable(samples[0].image)}
        meta |= {name: _describe(array) for name, array in zip(("images", "masks"), arrays, strict=True)}
        _meta_path(paths).write_text(json.dumps(meta))
    except OSError as error:  # a read-only or full cache folder must not stop training
        log.warning("could not write the decode cache in %s: %s", paths[0].parent, error)
