"""Decode every X-ray and mask once into uint8 arrays, with an optional on-disk ``.npy`` cache.

Training then indexes arrays in memory: no PNG is decoded per step. Each file is decoded from its
bytes by :mod:`covidseg.core.images` (type from the content, pixel count checked first).

Masks: a single-channel image with at most two values, 0 and one foreground value (0/1 and
0/255 both work); anything else (colour, several grey levels) is refused with the file named.

Cache entries are memory-mapped read-only, so the processes of a machine share one copy; one of
them builds a missing entry under a lock while the others wait. covidseg only ever replaces an
entry whole (a new file renamed over it), which leaves the maps of running processes intact; a
file edited or truncated in place under a running process would change or cut its data.
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

from covidseg.core.errors import DataError
from covidseg.core.files import open_regular_file, printable, read_file_bytes
from covidseg.core.images import check_xray_shape, read_gray, read_unchanged, resize_image
from covidseg.core.writing import atomic_output, exclusive_lock, write_atomic
from covidseg.data.index import Sample

log = logging.getLogger(__name__)
MAX_META_BYTES = 1_000_000  # a cache entry's record is a few hundred bytes
MAX_CACHE_BYTES = 1 << 40  # decoded arrays are large; the limit only keeps out what is not a file


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
    check_xray_shape(image, str(sample.image))
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


DECODER_VERSION = 2  # 2: EXIF orientation applied; a new value rebuilds caches decoded the old way


def _cache_key(samples: Sequence[Sample], size: int) -> str:
    digest = hashlib.sha1(f"{size}|{DECODER_VERSION}".encode())
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
    if cache_dir is None:
        return _decode_all(samples, image_size)
    key = _cache_key(samples, image_size)
    cache_files = (Path(cache_dir) / f"{key}-images.npy", Path(cache_dir) / f"{key}-masks.npy")
    cached = _load_cache(cache_files, quiet=True)
    if cached is not None:
        return cached
    try:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        building = exclusive_lock(Path(cache_dir), wait=True)
    except OSError:  # a cache folder that cannot be made: decoded, and the writing warns
        return _decode_all(samples, image_size, cache_files)
    with building:  # one process of a machine builds an entry; the others wait and then map it
        cached = _load_cache(cache_files)
        return cached if cached is not None else _decode_all(samples, image_size, cache_files)


def _decode_all(
    samples: Sequence[Sample], image_size: int, cache_files: tuple[Path, Path] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Decode every sample (in threads: OpenCV releases the GIL) straight into the arrays: with
    ``cache_files``, into the cache files themselves (mapped from disk while they are written), so
    building an entry of any size holds about one image per thread in memory, not the dataset twice."""
    first_image, first_masks = _decode_sample(samples[0], image_size)
    shapes = ((len(samples), *first_image.shape), (len(samples), *first_masks.shape))
    if cache_files is not None:
        try:
            return _decode_into_cache(samples, image_size, cache_files, shapes)
        except OSError as error:  # a read-only or full cache folder must not stop training
            log.warning("could not write the decode cache in %s: %s", cache_files[0].parent, error)
    images, masks = np.empty(shapes[0], np.uint8), np.empty(shapes[1], np.uint8)
    _fill(samples, image_size, images, masks)
    return images, masks


def _fill(samples: Sequence[Sample], image_size: int, images: np.ndarray, masks: np.ndarray) -> None:
    def one(index: int) -> None:
        images[index], masks[index] = _decode_sample(samples[index], image_size)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for _ in pool.map(one, range(len(samples))):  # re-raises a worker's error (a bad file, named)
            pass


def _decode_into_cache(
    samples: Sequence[Sample], image_size: int, paths: tuple[Path, Path], shapes: tuple[tuple[int, ...], ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Decode into temporary ``.npy`` files beside the entry, renamed over it once whole (each a name
    of its own: runs at once never share one); the record (written last) says what
    :func:`_load_cache` checks. The builder then maps the entry like every other process."""
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(paths[0]) as image_file, atomic_output(paths[1]) as mask_file:
        arrays = tuple(
            np.lib.format.open_memmap(file, mode="w+", dtype=np.uint8, shape=shape)
            for file, shape in zip((image_file, mask_file), shapes, strict=True)
        )
        for file in (image_file, mask_file):  # the disk space taken now: a full disk is an OSError here,
            with open(file, "r+b") as handle:  # never a SIGBUS when a mapped page is written later
                os.posix_fallocate(handle.fileno(), 0, os.fstat(handle.fileno()).st_size)
        _fill(samples, image_size, *arrays)
        for array in arrays:
            array.flush()
        described = {name: _describe(array) for name, array in zip(("images", "masks"), arrays, strict=True)}
        del arrays  # unmapped before the files are synced and renamed
    meta = {"image_size": image_size, "count": len(samples), "first": printable(samples[0].image)} | described
    write_atomic(_meta_path(paths), json.dumps(meta))
    mapped = _load_cache(paths)
    if mapped is None:
        raise OSError(f"the decode cache just written in {printable(paths[0].parent)} does not read back")
    return mapped


def _describe(array: np.ndarray) -> dict:
    """What a cache entry must match when it is loaded again (the checksum read in place: a mapped
    entry is not copied into the process)."""
    contiguous = np.ascontiguousarray(array)
    return {"shape": list(array.shape), "dtype": array.dtype.str, "crc32": zlib.crc32(memoryview(contiguous).cast("B"))}


def _meta_path(paths: tuple[Path, Path]) -> Path:
    return paths[0].with_name(paths[0].name.replace("-images.npy", ".json"))


def _load_array(path: Path) -> np.ndarray:
    """The entry memory-mapped read-only: the processes of a machine (DDP ranks, loader workers)
    share one copy in the page cache instead of holding one each."""
    with open_regular_file(path, MAX_CACHE_BYTES, "a decode cache entry", DataError):
        pass  # a link, a pipe, a device or an oversized file is refused before numpy maps it
    return np.load(path, mmap_mode="r", allow_pickle=False)


def _load_cache(paths: tuple[Path, Path], quiet: bool = False) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached arrays when present and intact (shape, dtype and checksum as recorded); a damaged
    or unverifiable entry is reported in one line (unless ``quiet``) and rebuilt."""
    if not any(path.exists() for path in paths):
        return None
    try:
        expected = json.loads(read_file_bytes(_meta_path(paths), MAX_META_BYTES, "a decode cache's record", DataError))
        if not isinstance(expected, dict):
            raise ValueError("its record is not a table of names and values")
        arrays = tuple(_load_array(path) for path in paths)
        for name, array in zip(("images", "masks"), arrays, strict=True):
            if name not in expected:
                raise ValueError(f"no recorded shape, type and checksum for the {name}")
            if _describe(array) != expected[name]:
                raise ValueError(f"the {name} do not match their recorded shape, type and checksum")
    except (OSError, ValueError, TypeError, EOFError, RecursionError, MemoryError) as error:  # DataError: ValueError
        if not quiet:
            log.warning("decode cache %s is damaged (%s): rebuilding it", printable(paths[0].parent), error)
        return None
    return arrays
