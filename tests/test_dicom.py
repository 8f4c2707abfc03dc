"""DICOM as a radiologist's viewer shows it: modality LUT, window, MONOCHROME1 (files made by pydicom)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import dicom_bytes

from covidseg.core.images import decode_unchanged

pytest.importorskip("pydicom")
RAMP = np.arange(4096, dtype=np.uint16).reshape(64, 64)  # every 12-bit value once


def decode(pixels: np.ndarray, **attributes) -> np.ndarray:
    gray, kind = decode_unchanged(dicom_bytes(pixels, BitsStored=12, HighBit=11, **attributes), "test.dcm")
    assert kind == "DICOM"
    return gray


def test_without_a_window_the_modality_values_are_scaled_to_8_bits() -> None:
    gray = decode(RAMP)
    assert gray.dtype == np.uint8 and (gray.min(), gray.max()) == (0, 255)
    assert np.all(np.diff(gray.ravel().astype(int)) >= 0)
    flipped = decode(RAMP, RescaleSlope=-1, RescaleIntercept=0)  # the modality LUT reverses the ramp
    assert flipped[0, 0] == 255 and flipped[-1, -1] == 0


@pytest.mark.parametrize(
    ("rescale", "centre", "width", "below", "above", "middle"),
    [
        ({}, 1000, 500, 749, 1251, 1000),  # stored values are the modality values
        ({"RescaleSlope": 2, "RescaleIntercept": -1000}, 0, 400, 399, 601, 500),  # window in rescaled units
    ],
    ids=["plain", "rescaled"],
)
def test_the_window_maps_to_the_full_range_and_clips_outside(rescale, centre, width, below, above, middle) -> None:
    gray = decode(RAMP, WindowCenter=centre, WindowWidth=width, **rescale).ravel()
    assert gray[: below + 1].max() == 0 and gray[above:].min() == 255
    assert abs(int(gray[middle]) - 128) <= 2
    assert np.all(np.diff(gray.astype(int)) >= 0)


def test_monochrome1_is_inverted() -> None:
    normal = decode(RAMP, WindowCenter=2048, WindowWidth=4096)
    inverted = decode(RAMP, WindowCenter=2048, WindowWidth=4096, PhotometricInterpretation="MONOCHROME1")
    assert np.array_equal(inverted.astype(int), 255 - normal.astype(int))
    assert inverted[0, 0] == 255  # low values are white in MONOCHROME1
