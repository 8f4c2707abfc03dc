"""The LightningDataModule for COVID-QU-Ex splits (real or synthetic)."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
import numpy as np
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader

from covidseg.core.errors import DataError
from covidseg.data.dataset import XRaySegmentationDataset
from covidseg.data.decode import decode_samples
from covidseg.data.index import Sample, canonical_split, find_split_root, index_split
from covidseg.data.sampler import EpochShuffleSampler, distributed_rank
from covidseg.data.synthetic import SyntheticPhantoms
from covidseg.data.teacher_targets import load_teacher_targets


class CovidQuExDataModule(L.LightningDataModule):
    """Train on ``Train``, validate on ``Val``, and test (train's final test, eval, calibrate) on ``split``.

    Args:
        root: folder holding Train/Val/Test, or a parent up to two levels above it.
        classes: classes to train on (``COVID-19``, ``Non-COVID``, ``Normal``).
        eval_classes: classes to validate and test on; defaults to ``classes``.
        targets: mask channels, a subset of ``infection`` and ``lung``, in order.
        image_size: side of the square the images are resized to.
        split: the split that ``test`` uses.
        train_transform: albumentations pipeline for training samples only.
        cache_dir: where decoded arrays are cached as ``.npy``; ``None`` keeps them in memory only.
        synthetic: a phantom generator that writes ``root`` first (``data=synthetic``).
        seed: seeds the training order and augmentation (per epoch and sample), and the folds.
        num_folds: with k >= 2, Train and Val are pooled and split into k folds stratified by class;
            fold ``fold`` validates and the others train. The test split never joins a fold.
        fold: which fold validates, ``0 <= fold < num_folds``.
        teacher_targets: an ``.npz`` from ``python -m covidseg.distill``: a teacher's probabilities
            for every training image, yielded as ``"teacher"`` with the training samples.
    """

    def __init__(
        self,
        root: str | Path,
        classes: Sequence[str] = ("COVID-19",),
        eval_classes: Sequence[str] | None = None,
        targets: Sequence[str] = ("infection",),
        image_size: int = 256,
        split: str = "Test",
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        train_transform: Callable[..., dict] | None = None,
        cache_dir: str | Path | None = None,
        synthetic: SyntheticPhantoms | None = None,
        seed: int = 0,
        num_folds: int | None = None,
        fold: int = 0,
        teacher_targets: str | Path | None = None,
    ) -> None:
        super().__init__()
        self.root = Path(root)
        self.classes = list(classes)
        self.eval_classes = list(eval_classes) if eval_classes else list(classes)
        self.targets = list(targets)
        self.image_size = image_size
        self.split = canonical_split(split)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.train_transform = train_transform
        self.cache_dir = cache_dir
        self.synthetic = synthetic
        self.seed = seed
        if num_folds is not None and (num_folds < 2 or not 0 <= fold < num_folds):
            raise DataError(
                f"data.num_folds={num_folds} and data.fold={fold}: need num_folds >= 2 and 0 <= fold < num_folds"
            )
        self.num_folds = num_folds
        self.fold = fold
        self.teacher_targets = teacher_targets
        self.datasets: dict[str, XRaySegmentationDataset] = {}

    def prepare_data(self) -> None:
        if self.synthetic is not None:
            self.synthetic.write(self.root)

    def has_split(self, split: str) -> bool:
        """Whether ``split`` exists under ``root`` (COVID-QU-Ex copies may lack Test)."""
        if self.synthetic is not None and not self.root.exists():
            return canonical_split(split) in self.synthetic.counts
        return (find_split_root(self.root) / canonical_split(split)).is_dir()

    def dataset(self, split: str, train: bool = False) -> XRaySegmentationDataset:
        """Index, decode (or load from cache) and wrap one split; built once per split and role."""
        split = canonical_split(split)
        key = f"{split}:{'train' if train else 'eval'}"
        if key not in self.datasets:
            classes = self.classes if train else self.eval_classes
            if self.num_folds and split in ("Train", "Val"):
                samples = self._fold_samples(split == "Val", classes)
            else:
                samples = index_split(self.root, split, classes, self.targets)
            images, masks = decode_samples(samples, self.image_size, self.cache_dir)
            transform = self.train_transform if train else None
            names = [sample.name for sample in samples]
            soft_targets = None
            if train and self.teacher_targets is not None:
                soft_targets = load_teacher_targets(self.teacher_targets, names, self.image_size)
            self.datasets[key] = XRaySegmentationDataset(images, masks, names, transform, self.seed, soft_targets)
        return self.datasets[key]

    def _fold_samples(self, validation: bool, classes: list[str]) -> list[Sample]:
        """Train+Val of ``classes``, split into folds per class: a sample's fold depends only on its
        class, its name and the seed, so the train and validation roles always agree."""
        selected = []
        for label in classes:
            pool = sorted(
                (
                    *index_split(self.root, "Train", [label], self.targets),
                    *index_split(self.root, "Val", [label], self.targets),
                ),
                key=lambda sample: str(sample.image),
            )
            order = np.random.default_rng([self.seed, zlib.crc32(label.encode())]).permutation(len(pool))
            in_fold = [position % self.num_folds == self.fold for position in range(len(pool))]
            selected += [pool[i] for i, held_out in zip(order, in_fold, strict=True) if held_out == validation]
        return selected

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.dataset("Train", train=True)
            self.dataset("Val")
        elif stage == "validate":
            self.dataset("Val")
        elif stage == "test":
            self.dataset(self.split)
        else:
            raise DataError(f"unknown stage {stage!r}")

    def _loader(self, dataset: XRaySegmentationDataset, train: bool) -> DataLoader:
        drop_last = train and len(dataset) > self.batch_size
        if train:
            sampler = self._train_sampler(len(dataset), drop_last)
        elif distributed_rank()[1] > 1:  # each image once across ranks: no padding, no double counting
            sampler = UnrepeatedDistributedSampler(dataset, shuffle=False)
        else:
            sampler = None
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def _train_sampler(self, dataset_size: int, drop_last: bool) -> EpochShuffleSampler:
        """Seeded per epoch; after a mid-epoch resume, the batches already trained on are left out.

        "Processed" counts batches whose optimizer step is done, also in a checkpoint written from
        ``on_train_batch_end`` (Lightning's "completed" lags one behind there).
        """
        sampler = EpochShuffleSampler(dataset_size, self.seed)
        if self.trainer is not None and self.trainer.ckpt_path:
            size = len(sampler)  # this rank's share of the epoch
            batches_per_epoch = size // self.batch_size if drop_last else -(-size // self.batch_size)
            progress = self.trainer.fit_loop.epoch_loop.batch_progress
            # a checkpoint from an epoch's end starts the next epoch whole
            done = 0 if progress.is_last_batch else progress.current.processed % batches_per_epoch
            sampler.skip_next(done * self.batch_size)
        return sampler

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("Train", train=True), train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("Val"), train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.dataset(self.split), train=False)
