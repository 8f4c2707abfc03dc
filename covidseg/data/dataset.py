"""A map-style dataset over decoded uint8 arrays, augmented with albumentations."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset


class XRaySegmentationDataset(Dataset):
    """Yields ``{"image": (1, S, S) float in [0, 1], "mask": (T, S, S) float in {0, 1}, "name"}``,
    plus ``"teacher"`` (1, S, S) float in [0, 1] when ``soft_targets`` (uint8 (N, S, S), probability ×
    255) are given: they are augmented with the masks, so they stay aligned with the image.

    A key ``epoch * len(self) + index`` (from :class:`EpochShuffleSampler`) selects sample ``index``
    and seeds its augmentation with ``(seed, key)``: each epoch augments differently, and the same
    run always augments the same way.
    """

    def __init__(
        self,
        images: np.ndarray,
        masks: np.ndarray,
        names: Sequence[str],
        transform: Callable[..., dict] | None = None,
        seed: int = 0,
        soft_targets: np.ndarray | None = None,
    ) -> None:
        if not len(images) == len(masks) == len(names):
            raise ValueError(f"{len(images)} images, {len(masks)} masks and {len(names)} names differ")
        if soft_targets is not None and soft_targets.shape != (len(images), *images.shape[1:]):
            raise ValueError(f"soft targets {soft_targets.shape} do not match the images {images.shape}")
        self.images = images
        self.masks = masks
        self.soft_targets = soft_targets
        self.names = list(names)
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int) -> dict[str, torch.Tensor | str]:
        index = key % len(self)
        image = np.array(self.images[index])  # a copy: the arrays may be a read-only map of the decode cache
        mask = np.array(self.masks[index])
        channels = len(mask)
        if self.soft_targets is not None:  # one more mask channel, so that it moves with the masks
            mask = np.concatenate([mask, self.soft_targets[index][None]])
        if self.transform is not None:
            if hasattr(self.transform, "set_random_seed"):  # albumentations.Compose
                self.transform.set_random_seed(int(np.random.SeedSequence([self.seed, key]).generate_state(1)[0]))
            # albumentations wants channel-last masks.
            out = self.transform(image=image, mask=mask.transpose(1, 2, 0))
            image, mask = out["image"], out["mask"].transpose(2, 0, 1)
        item = {
            "image": torch.from_numpy(np.ascontiguousarray(image)).unsqueeze(0).float().div_(255),
            "mask": torch.from_numpy(np.ascontiguousarray(mask[:channels])).float(),
            "name": self.names[index],
        }
        if self.soft_targets is not None:
            item["teacher"] = torch.from_numpy(np.ascontiguousarray(mask[channels:])).float().div_(255)
        return item
