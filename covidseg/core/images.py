"""Image files and uploads decoded from bytes: the type from the content, the size checked first.

Files are read as bytes and decoded with ``cv2.imdecode``: OpenCV never sees a file name, so no
name (any bytes, not UTF-8) can crash native code. The type comes from the content (Pillow reads
the header; DICOM by its ``DICM`` mark), and the header's width x height is checked before
decoding, so a small file that claims a huge image (a decompression bomb) is refused without
allocating it. Image files named by a file, a folder or a glob are found here too (symlinked
folders not followed). Training's decode cache (:mod:`covidseg.data.decode`), ``predict`` and the server's
uploads (:mod:`covidseg.serving.app`, bytes that never touch the disk) all decode here.
"""

from __future__ import annotations

import glob
import io
import os
import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from covidseg.core.errors import DataError, UserError
from covidseg.core.files import printable, read_file_bytes

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm")  # what a folder of images holds
MAX_PIXELS = 50_000_000  # width x height; larger files are refused before decoding (decompression bombs)
MAX_FILE_BYTES = 1 << 30  # 50 M pixels of 16-bit RGBA, uncompressed, is 400 MB
MIN_SIDE, MAX_ASPECT = 32, 4.0  # predict and serve answer for nothing smaller or more elongated than this
COLOUR_SPREAD, MAX_COLOUR_SHARE = 1 / 8, 0.10  # ... nor for a colour picture (see xray_gray)
DEFLATED_DICOM = b"1.2.840.10008.1.2.1.99"  # the deflate transfer syntax's UID
RASTER_FORMATS = ("PNG", "JPEG", "TIFF", "BMP")  # what Pillow must recognise in the header; OpenCV decodes
SAME_AS = {"MPO": "JPEG"}  # a phone's multi-picture JPEG: its first picture is a JPEG


def is_dicom(data: bytes) -> bool:
    """A DICOM Part 10 file: 128 bytes of preamble, then ``DICM``."""
    return data[128:132] == b"DICM"


def _checked_pixels(name: str, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise DataError(
            f"{name!r} is {width}x{height} = {width * height:,} pixels; at most {max_pixels:,} are read "
            "(a larger image is refused before it is decoded)"
        )


def _decoder_installed(syntax: object) -> bool:
    try:
        from pydicom.pixels import get_decoder

        return bool(get_decoder(syntax).is_available)
    except Exception:  # a transfer syntax pydicom has no decoder class for
        return False


def decode_dicom(data: bytes, name: str, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """A DICOM image as a radiologist's viewer shows it, as 8-bit gray (needs the ``dicom`` extra).

    pydicom applies the modality LUT (rescale slope/intercept) and the first VOI LUT or window
    (centre/width); a window maps to the full 0-255 range, with values outside it clipped.
    Without a window the modality values are scaled min-max. MONOCHROME1 (white = low) is
    inverted; a multi-frame file gives its first frame; a colour one is converted to gray.
    """
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError as error:
        raise DataError(
            f"{name!r} is DICOM: install the extra with pip install 'covidseg[dicom]' "
            "(in a checkout: pip install -e '.[dicom]')"
        ) from error
    # sought in the whole file, not only where the file meta usually ends: a padded meta group can
    # push it kilobytes in (a false match only refuses a rare file, a miss inflates a bomb)
    if DEFLATED_DICOM in data:
        raise DataError(
            f"{name!r} is deflated DICOM, which would be inflated whole before its size could be checked; it is "
            "not read: save it uncompressed or JPEG-compressed"
        )
    dataset = None
    try:
        dataset = pydicom.dcmread(io.BytesIO(data), force=True)
        if not any(key in dataset for key in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            raise DataError(f"{name!r} is a DICOM file without pixel data: it holds no image to read")
        frames = int(getattr(dataset, "NumberOfFrames", 1) or 1)
        _checked_pixels(name, int(dataset.Columns), int(dataset.Rows) * frames, max_pixels)
        pixels = dataset.pixel_array
        if int(getattr(dataset, "SamplesPerPixel", 1)) > 1:  # colour: RGB, to_gray expects OpenCV's BGR
            return to_gray(np.ascontiguousarray((pixels[0] if frames > 1 else pixels)[..., ::-1]))
        if int(getattr(dataset, "BitsAllocated", 8)) == 1:
            raise DataError(f"{name!r} is a 1-bit (black and white) DICOM image: expected a grey X-ray")
        pixels = pixels[0] if frames > 1 else pixels
        values = apply_modality_lut(pixels, dataset).astype(np.float64)
        if not np.isfinite(values).all():  # a NaN or infinite rescale slope or intercept
            raise DataError(f"{name!r}: its rescale slope or intercept makes pixel values NaN or infinite")
        if "WindowCenter" in dataset and "WindowWidth" in dataset and "VOILUTSequence" not in dataset:
            low, high = apply_voi_lut(np.array([-1e300, 1e300]), dataset)  # the window's output range
            shown = (apply_voi_lut(values, dataset) - low) / max(high - low, 1e-12) * 255
            gray = np.clip(shown, 0, 255).round().astype(np.uint8)
        else:
            if "VOILUTSequence" in dataset:
                values = apply_voi_lut(values.round().astype(np.int64), dataset)
            gray = to_gray(np.asarray(values, np.float32))
    except DataError:
        raise
    except Exception as error:  # pydicom raises many kinds for corrupt or unusual files
        syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
        if syntax is not None and getattr(syntax, "is_compressed", False) and "plugin" in str(error):
            if _decoder_installed(syntax):
                raise DataError(
                    f"{name!r} is DICOM compressed as {syntax.name}, and its pixel data is damaged"
                ) from None
            raise DataError(
                f"{name!r} is DICOM compressed as {syntax.name}, and no decoder for it is installed: "
                "pip install pylibjpeg pylibjpeg-openjpeg pylibjpeg-libjpeg (JPEG, JPEG-LS, JPEG 2000)"
            ) from None
        first_line = (str(error).splitlines() or [type(error).__name__])[0][:200]
        raise DataError(f"{name!r} could not be read as DICOM: {first_line}") from None
    if getattr(dataset, "PhotometricInterpretation", "") == "MONOCHROME1":
        gray = 255 - gray
    return gray


def image_format(data: bytes, name: str, max_pixels: int = MAX_PIXELS) -> tuple[str, int]:
    """``PNG``, ``JPEG``, ``TIFF``, ``BMP`` or ``DICOM``, found from the content (never the name), and
    the EXIF orientation (1 to 8; 1: as stored); the header's size is checked against ``max_pixels``
    before anything is decoded."""
    if not data:
        raise DataError(f"{name!r} is empty (0 bytes): replace or remove the file")
    if is_dicom(data):
        return "DICOM", 1
    orientation = 1
    try:
        with warnings.catch_warnings():  # Pillow's own bomb warning: the limit here is max_pixels
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as header:  # reads the header only
                found, (width, height) = header.format, header.size
                try:
                    orientation = int(header.getexif().get(EXIF_ORIENTATION, 1))
                except Exception:  # a damaged EXIF block (any Pillow error): the pixels as stored
                    orientation = 1
    except Image.DecompressionBombError:
        raise DataError(f"{name!r} is an image of more than {max_pixels:,} pixels; it is not decoded") from None
    except ValueError as error:
        if "MAX_TEXT_CHUNK" in str(error):  # Pillow's limit on compressed text (metadata) chunks
            raise DataError(
                f"{name!r} is a PNG with a text chunk (metadata) that inflates past Pillow's safe limit; it is not "
                "read: save the image again without its metadata"
            ) from None
        found, width, height = None, 0, 0
    except (OSError, SyntaxError):
        found, width, height = None, 0, 0
    found = SAME_AS.get(found, found)
    if found is None and data[:4] in (b"II*\x00", b"MM\x00*"):  # a TIFF whose header Pillow cannot read
        raise DataError(
            f"{name!r} is a TIFF of a kind that cannot be read safely (e.g. 64-bit floating point pixels): "
            "save it as 8- or 16-bit grey"
        )
    if found not in RASTER_FORMATS:
        raise DataError(
            f"{name!r} is not a {', '.join(RASTER_FORMATS)} or DICOM image (judged by its content, not its name)"
        )
    _checked_pixels(name, width, height, max_pixels)
    oriented_by_opencv = found == "TIFF"  # OpenCV's TIFF reader applies the orientation tag itself
    return found, 1 if oriented_by_opencv or orientation not in ORIENTED else orientation


EXIF_ORIENTATION = 0x0112
ORIENTED = {  # EXIF orientation -> the turn that shows the image upright, as viewers do (OpenCV's
    # IMREAD_UNCHANGED, which keeps bit depth and channels, does not apply it)
    1: lambda image: image,
    2: lambda image: image[:, ::-1],
    3: lambda image: image[::-1, ::-1],
    4: lambda image: image[::-1],
    5: lambda image: image.swapaxes(0, 1),
    6: lambda image: image.swapaxes(0, 1)[:, ::-1],
    7: lambda image: image.swapaxes(0, 1)[::-1, ::-1],
    8: lambda image: image.swapaxes(0, 1)[::-1],
}


def decode_unchanged(
    data: bytes, name: str, max_pixels: int = MAX_PIXELS, dicom: bool = False
) -> tuple[np.ndarray, str]:
    """Decode image bytes as stored (channels and bit depth kept) and say which format they were
    (:func:`image_format`); ``dicom`` reads a ``.dcm`` file without the DICM preamble too."""
    kind, orientation = ("DICOM", 1) if dicom and data else image_format(data, name, max_pixels)
    if kind == "DICOM":
        return decode_dicom(data, name, max_pixels), kind
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise DataError(f"{name!r} could not be decoded as an image: the file is corrupt or truncated")
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise DataError(f"{name!r} holds NaN or infinite pixel values: expected finite grey levels")
    return np.ascontiguousarray(ORIENTED[orientation](image)), kind


def to_gray(image: np.ndarray) -> np.ndarray:
    """8-bit grayscale from any decoded image (RGB(A) converted, other depths min-max scaled)."""
    if image.ndim == 3:
        code = cv2.COLOR_BGRA2GRAY if image.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        image = cv2.cvtColor(image, code)
    if image.dtype != np.uint8:
        image = cv2.normalize(image.astype(np.float32), None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    return image


# a real X-ray has far fewer pixels at one grey level: at most 0.58 of them over the 4,660 Train and Val images
MAX_ONE_LEVEL_SHARE = 0.99


def xray_gray(image: np.ndarray, name: str) -> np.ndarray:
    """``image`` (as decoded, channels and depth kept) as 8-bit gray, if predict and serve can answer
    for it: a colour picture (over ``MAX_COLOUR_SHARE`` of its pixels with channels further apart
    than ``COLOUR_SPREAD`` of its range), a single grey level, a side under ``MIN_SIDE`` or a side
    over ``MAX_ASPECT`` times the other holds no chest X-ray, and the network would still return a
    confident mask for it. A grey X-ray saved as RGB, or with a small coloured mark on it, passes."""
    if image.ndim == 3:
        colour = image[..., :3].astype(np.float32)
        spread = colour.max(axis=2) - colour.min(axis=2)
        coloured = float(np.mean(spread > COLOUR_SPREAD * max(float(np.ptp(colour)), 1.0)))
        if coloured > MAX_COLOUR_SHARE:
            raise DataError(
                f"{name!r} is a colour picture ({coloured:.0%} of its pixels coloured): expected a grey chest "
                f"X-ray (at most {MAX_COLOUR_SHARE:.0%} coloured); if it is one, save it in grey"
            )
    gray = to_gray(image)
    check_xray_shape(gray, name)
    if gray.min() == gray.max():
        raise DataError(f"{name!r} has a single grey level ({int(gray.min())}): there is no X-ray in it to segment")
    counts = np.bincount(gray.ravel(), minlength=256)
    if counts.max() > MAX_ONE_LEVEL_SHARE * gray.size:
        raise DataError(
            f"{name!r} is nearly blank ({counts.max() / gray.size:.2%} of its pixels are grey level "
            f"{int(counts.argmax())}): there is no X-ray in it to segment"
        )
    return gray


def check_xray_shape(image: np.ndarray, name: str) -> None:
    """An image shaped like a chest X-ray: at least ``MIN_SIDE`` pixels a side and at most
    ``MAX_ASPECT`` times as long as wide (predict refuses anything else, and training does too:
    a 1x1 or 10000x1 picture stretched to the network's side teaches it nothing true)."""
    height, width = image.shape[:2]
    if min(height, width) < MIN_SIDE or max(height, width) > MAX_ASPECT * min(height, width):
        raise DataError(
            f"{name!r} is {width}x{height} pixels: expected a chest X-ray, at least {MIN_SIDE} pixels a side "
            f"and at most {MAX_ASPECT:g} times as long as wide"
        )


def read_unchanged(path: Path) -> np.ndarray:
    """Decode an image file as stored, from its bytes (type found from the content)."""
    return decode_unchanged(
        read_file_bytes(path, MAX_FILE_BYTES, "an image file", DataError),
        str(path),
        dicom=path.suffix.lower() == ".dcm",
    )[0]


def read_gray(path: Path) -> np.ndarray:
    """Read a PNG, JPEG, TIFF, BMP or DICOM file as 8-bit grayscale (RGB and 16-bit are converted)."""
    return to_gray(read_unchanged(path))


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Area interpolation keeps thin structures when shrinking an X-ray."""
    if image.shape == (size, size):
        return image
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)


def _walk(folder: Path) -> list[Path]:
    """Image files below ``folder``; symlinked folders are not entered, so a loop cannot be followed."""
    files = []
    for root, folders, names in os.walk(folder, followlinks=False):
        folders.sort()
        files += [Path(root, name) for name in sorted(names) if Path(name).suffix.lower() in IMAGE_SUFFIXES]
    return files


def _first_magic_part(path: Path) -> int:
    return next((index for index, part in enumerate(path.parts) if glob.has_magic(part)), len(path.parts))


def find_inputs(pattern: str, named_by: str = "input", error: type[UserError] = DataError) -> tuple[list[Path], Path]:
    """Image files named by a file, a folder (searched recursively) or a glob, and their common base;
    when there are none, ``error`` is raised, its message starting with ``named_by`` (the setting).

    Each file is listed once (by its real path), and symlinked folders are not followed (pathlib's
    ``**`` does not follow them either).
    """
    path = Path(pattern).expanduser()
    if path.is_file():
        candidates, base = [path], path.parent
    elif path.is_dir():
        candidates, base = _walk(path), path
    else:
        magic = _first_magic_part(path)
        base = Path(*path.parts[:magic]) if magic else Path()
        rest = Path(*path.parts[magic:]) if magic < len(path.parts) else None
        candidates = sorted(p for p in base.glob(str(rest)) if p.is_file()) if rest and base.is_dir() else []
    chosen: dict[str, Path] = {}  # real path -> the name it is predicted under (a link only if no other)
    for candidate in candidates:
        real = os.path.realpath(candidate)
        if real not in chosen or (chosen[real].is_symlink() and not candidate.is_symlink()):
            chosen[real] = candidate
    files = [candidate for candidate in candidates if chosen[os.path.realpath(candidate)] is candidate]
    if not files:
        raise error(f"{named_by} {printable(pattern)!r} names no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files, base
