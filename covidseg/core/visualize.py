"""Overlays of masks on X-rays, shared by TensorBoard images and prediction outputs."""

from __future__ import annotations

import cv2
import numpy as np

TRUTH_COLOR = (0, 200, 0)  # RGB
PREDICTION_COLOR = (230, 40, 40)
LUNG_COLOR = (240, 200, 0)


def overlay(image: np.ndarray, mask: np.ndarray, color: tuple[int, int, int], alpha: float = 0.35) -> np.ndarray:
    """Tint ``mask`` (H, W; nonzero = positive) on a grayscale uint8 ``image`` and outline it.

    Returns an RGB uint8 array of the image's size.
    """
    rgb = np.repeat(image[..., None], 3, axis=2).astype(np.float32)
    positive = mask.astype(bool)
    rgb[positive] = (1 - alpha) * rgb[positive] + alpha * np.asarray(color, np.float32)
    return outline(rgb.astype(np.uint8), positive, color)


def outline(rgb: np.ndarray, mask: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    """Draw the outer contours of ``mask`` on an RGB uint8 image, in place; returns it."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(rgb, contours, -1, color, max(1, rgb.shape[0] // 256))
    return rgb


def comparison_row(image: np.ndarray, truth: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """``X-ray | truth overlay | prediction overlay`` side by side, RGB uint8."""
    gray = np.repeat(image[..., None], 3, axis=2)
    return np.concatenate(
        [gray, overlay(image, truth, TRUTH_COLOR), overlay(image, prediction, PREDICTION_COLOR)], axis=1
    )


PNG_SOFTWARE = "covidseg"  # the PNG text entry that marks a chart as covidseg's own


def figure_png(figure) -> bytes:
    """A matplotlib figure as PNG bytes (the figure is closed)."""
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight", metadata={"Software": PNG_SOFTWARE})
    plt.close(figure)
    return buffer.getvalue()
