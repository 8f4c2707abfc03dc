"""A map-style dataset over decoded uint8 arrays, augmented with albumentations."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset


class XRaySegmentationDataset(Dataset):
    """Yields ``{"image": (1, S, S) float in [0, 1], "mask": (T, S, S) float in {0, 1}, "name"}``.

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
    ) -> None:
        if not len(images) == len(masks) == len(names):
            raise ValueError(f"{len(images)} images, {len(masks)} masks and {len(names)} names differ")
        self.images = images
        self.masks = masks
        self.names = list(names)
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int) -> dict[str, torch.Tensor | str]:
        index = key % len(self)
        image = self.images[index]
        mask = self.masks[index]
        if self.transform is not None:
            if hasattr(self.transform, "set_random_seed"):  # albumentations.Compose
                self.transform.set_random_seed(int(np.random.SeedSequence([self.seed, key]).generate_state(1)[0]))
            # albumentations wants channel-last masks.
            out = self.transform(image=image, mask=mask.transpose(1, 2, 0))
            image, mask = out["image"], out["mask"].transpose(2, 0, 1)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image)).unsqueeze(0).float().div_(255),
            "mask": torch.from_numpy(np.ascontiguousarray(mask)).float(),
            "name": self.names[index],
        }
