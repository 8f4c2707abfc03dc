"""Connected regions of a predicted mask: dropping the specks beside the lesions.

A thresholded probability map carries small isolated regions that are rarely lesions; on the
shipped model, dropping regions under 0.6 % of the image raised Val Dice by 0.002 at every
healthy-clean floor (docs/results.md, *Small regions*). The largest region always stays: emptying
a mask is the presence gate's decision, not this filter's. OpenCV labels the regions.
"""

from __future__ import annotations

import cv2
import numpy as np


def drop_small_regions(mask: np.ndarray, min_share: float) -> np.ndarray:
    """``mask`` (H, W) bool without its 8-connected regions smaller than ``min_share`` of the image,
    except the largest."""
    if min_share <= 0 or not mask.any():
        return mask
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    areas = stats[:, cv2.CC_STAT_AREA]
    keep = areas >= min_share * mask.size
    keep[1 + np.argmax(areas[1:])] = True
    keep[0] = False  # the background
    return keep[labels]
