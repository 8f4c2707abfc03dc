"""predict's work in Lightning's predict loop, on one process or many.

The inputs the record lacks are shared out over the processes (ranks) of ``trainer=ddp_cpu
trainer.devices=N`` (and ``trainer.num_nodes``): rank ``r`` of ``W`` takes every ``W``-th image from
the ``r``-th on, so the split depends on nothing but the inputs and the world size. Each predict step
runs one batch of decoded X-rays through the model (:func:`~covidseg.inference.segment.segment`);
a prediction writer writes each image's files and appends its line to the rank's own part of the
record (:class:`~covidseg.inference.manifest.Manifest`) as the batch finishes. One process runs the
same loop in the command's own process. Several are started with ``spawn``: the command's process
holds the output folder's lock and folds the parts and writes the CSV when the ranks are done, and
each rank loads the model itself (a compiled OpenVINO or ONNX Runtime model cannot be sent to
another process). The networks run on the CPU; Lightning gives each of a node's ranks its share
of the cores (``OMP_NUM_THREADS``), which the runtimes follow.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from hydra.utils import instantiate
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from covidseg.core.errors import ConfigError, DataError
from covidseg.core.files import printable
from covidseg.core.framework_noise import quiet_framework_noise
from covidseg.core.images import read_unchanged, xray_gray
from covidseg.core.writing import flush_to_disk
from covidseg.inference.image_files import output_stem, write_outputs
from covidseg.inference.manifest import Manifest
from covidseg.inference.predictor import Answer
from covidseg.inference.segment import Backend, ImageResult, LoadedBackend, load_configured_backend, segment

log = logging.getLogger(__name__)
WRITER_STAGE = "draw, encode and write (its own thread)"  # overlaps the others: not part of their sum
LOOP_STAGES = ("read and decode", "networks", "resize and post-process", "waiting for the writer", WRITER_STAGE)
PROGRESS_EVERY_S = 30.0


class StageClock:
    """Wall time per stage of one process's predict (``predict_bench`` prints the shares)."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(LOOP_STAGES, 0.0)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - started

    def timed(self, name: str, backend: Backend) -> Backend:
        def run(images: np.ndarray) -> Answer:
            with self.stage(name):
                return backend(images)

        return run


@dataclass
class InputImage:
    """One input as read: the decoded grayscale X-ray, or why it could not be read."""

    path: Path
    image: np.ndarray | None
    error: str | None
    seconds: float


class InputImages(Dataset):
    """Reads and decodes the X-rays of a list of files; an unreadable one comes back with its error."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> InputImage:
        path = self.paths[index]
        started = time.perf_counter()
        try:
            image, error = xray_gray(read_unchanged(path), str(path)), None
        except (DataError, OSError) as failure:
            image, error = None, str(failure)
        return InputImage(path, image, error, time.perf_counter() - started)


class InputShards(L.LightningDataModule):
    """This rank's share of the inputs to do: ``todo`` as the command's process found it, or (on the
    other machines of a multi-node run, ``todo=None``) the inputs the record lacks, read once every
    process has started, so after the first machine's command has folded a killed run's parts."""

    def __init__(self, files: list[Path], todo: list[Path] | None, output: Path, batch_size: int) -> None:
        super().__init__()
        self.files, self.todo, self.output, self.batch_size = files, todo, output, batch_size
        self.shard: list[Path] = []

    def setup(self, stage: str) -> None:
        todo = self.todo
        if todo is None:
            record = Manifest.read(self.output)
            todo = [path for path in self.files if record.entry(path) is None]
        self.shard = todo[self.trainer.global_rank :: self.trainer.world_size]

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(InputImages(self.shard), batch_size=self.batch_size, collate_fn=list)

    def transfer_batch_to_device(self, batch: list[InputImage], device: Any, dataloader_idx: int) -> list[InputImage]:
        """Decoded images stay where they are: the backend takes numpy arrays on the CPU (Lightning
        would otherwise copy every item of the batch looking for tensors)."""
        return batch


@dataclass
class Answered:
    """One input after its predict step: its result (``None`` when unreadable) and seconds per image."""

    item: InputImage
    result: ImageResult | None
    seconds: float


class SegmentImages(L.LightningModule):
    """The model as a predict step: a batch of decoded X-rays in, one :class:`Answered` per input out."""

    def __init__(self, cfg: DictConfig, model: LoadedBackend | None, clock: StageClock) -> None:
        super().__init__()
        self.cfg, self.model, self.clock = cfg, model, clock
        self.networks: Backend | None = None  # the model's run, timed (setup)
        self.allow_zero_length_dataloader_with_multiple_devices = True  # more ranks than images left

    def __getstate__(self) -> dict[str, Any]:
        """A started process loads the model itself (:meth:`setup`)."""
        return {**self.__dict__, "model": None, "networks": None}

    def setup(self, stage: str) -> None:
        if self.trainer.world_size > 1 and not logging.getLogger().handlers:  # a started process: log to stderr
            rank = f"rank {self.trainer.global_rank}/{self.trainer.world_size}"
            logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [{rank}] %(message)s")
            quiet_framework_noise()
        if self.model is None:
            self.model = load_configured_backend(self.cfg)
        self.networks = self.clock.timed("networks", self.model.run)

    def predict_step(self, batch: list[InputImage], batch_idx: int) -> list[Answered]:
        assert self.model is not None and self.networks is not None, "setup loads the model"
        readable = [item for item in batch if item.image is not None]
        with self.clock.stage("resize and post-process"):  # the networks' share is taken out at the end
            started = time.perf_counter()
            images = [item.image for item in readable]
            results = iter(segment(self.networks, self.model.spec, images, self.model.refuse_above) if readable else [])
        self.clock.seconds["read and decode"] += sum(item.seconds for item in batch)
        seconds = (time.perf_counter() - started + sum(item.seconds for item in readable)) / max(len(readable), 1)
        return [Answered(item, next(results) if item.image is not None else None, seconds) for item in batch]

    def on_predict_end(self) -> None:
        self.clock.seconds["resize and post-process"] -= self.clock.seconds["networks"]


class OutputWriter(BasePredictionWriter):
    """Writes each answered image's files and its line in the rank's part of the record, batch by
    batch, in a thread of its own while the loop predicts the next batch (drawing, PNG encoding and
    writing release the GIL, as the runtimes do): one batch at a time, in order, so a batch's lines
    still follow its files, and its error is raised in the loop's thread at the next batch or the end."""

    def __init__(self, output: Path, base: Path, inputs: set[Path], save_probability: bool, clock: StageClock) -> None:
        super().__init__(write_interval="batch")
        self.output, self.base, self.inputs, self.save_probability = output, base, inputs, save_probability
        self.clock = clock
        self.part: Manifest | None = None
        self.thread: ThreadPoolExecutor | None = None  # made in each process (spawned ranks get a copy)
        self.writing: Future | None = None  # the batch being written

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.part = Manifest.part(self.output, trainer.global_rank)
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="covidseg-writer")

    def finish_writing(self) -> None:
        """Wait for the batch being written; its error is raised here. A Ctrl-C during the wait
        leaves the batch in ``self.writing``, for :meth:`on_exception` to wait for."""
        writing = self.writing
        if writing is not None:
            with self.clock.stage("waiting for the writer"):
                wait([writing])
            self.writing = None
            writing.result()

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.finish_writing()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """A stop (SIGTERM, Ctrl-C, an error) still records the batches predicted before it."""
        with suppress(Exception):  # the stop's own error is the one to report
            self.finish_writing()
        self.stop_thread()  # Lightning calls no teardown after an exception

    def stop_thread(self) -> None:
        if self.thread is not None:
            self.thread.shutdown()
            self.thread = None

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Every process waits for the others, so the first machine's command folds the parts only
        once all are written: Lightning's predict loop ends without a barrier, and skips its end
        hooks in a process left without images, but always tears down."""
        self.finish_writing()
        self.stop_thread()
        trainer.strategy.barrier("predict_written")

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: list[Answered],
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        assert self.thread is not None, "setup starts the writing thread"
        self.finish_writing()  # the batch before, first: in order, and one batch's images in memory at a time
        self.writing = self.thread.submit(self._write_batch, prediction)

    def _write_batch(self, prediction: list[Answered]) -> None:
        assert self.part is not None, "setup opens the rank's part"
        with self.clock.stage(WRITER_STAGE):
            entries = [self._written(answered) for answered in prediction]
            if any(entry["status"] == "predicted" for entry in entries):
                flush_to_disk()  # the batch's files, before its lines say they are finished
            self.part.record(entries)

    def _written(self, answered: Answered) -> dict[str, Any]:
        """The image's files written, and its line in the record."""
        path, result = answered.item.path, answered.result
        if result is None:  # not recorded as finished: a rerun reads it again
            return Manifest.unfinished_entry(path, "skipped", answered.item.error or "unreadable")
        if result.refused:
            return Manifest.finished_entry(path, "refused", reason=result.refusal())
        try:
            write_outputs(result, output_stem(self.output, path, self.base), self.save_probability, self.inputs)
        except (DataError, OSError) as error:  # not recorded as finished: a rerun tries it again
            return Manifest.unfinished_entry(path, "failed", str(error))
        row = {"file": printable(path), **result.stats(), **(result.severity() or {})}
        row["seconds"] = round(answered.seconds, 4)
        return Manifest.finished_entry(path, "predicted", row=row)


class StopOnSigterm(Callback):
    """SIGTERM (a scheduler's stop, ``kill``) ends predict after the batch under way, as it ends
    training: Lightning's handler only notes it, and its predict loop never looks."""

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:  # fmt: skip
        if trainer.received_sigterm:
            raise SIGTERMException


class ProgressLog(Callback):
    """Each rank logs the images it has done, images/s and the time left, every half minute and at the end."""

    def __init__(self, every_s: float = PROGRESS_EVERY_S) -> None:
        self.every_s = every_s
        self.started = self.last = 0.0
        self.done = self.total = 0

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = self.last = time.perf_counter()
        self.done, self.total = 0, len(trainer.datamodule.shard)

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:  # fmt: skip
        self.done += len(batch)
        now = time.perf_counter()
        if now - self.last >= self.every_s or self.done == self.total:
            self.last = now
            rate = self.done / max(now - self.started, 1e-9)
            left = (self.total - self.done) / rate if rate else float("inf")
            log.info("rank %d of %d: %d/%d images, %.1f images/s, about %.0f s left",
                     trainer.global_rank, trainer.world_size, self.done, self.total, rate, left)  # fmt: skip


def prediction_trainer(cfg: DictConfig, callbacks: list[Callback]) -> L.Trainer:
    """Lightning's Trainer for predict from ``trainer.*``: CPU processes, started with ``spawn``."""
    settings = cfg.trainer
    if str(settings.get("accelerator", "cpu")) not in ("cpu", "auto"):
        raise ConfigError(
            f"trainer.accelerator={settings.accelerator}: predict runs its networks on the CPU; spread it over "
            "processes with trainer=ddp_cpu trainer.devices=N (and trainer.num_nodes=M)"
        )
    limit, quick = settings.get("limit_predict_batches"), settings.get("fast_dev_run", False)
    every_batch = limit is None or (isinstance(limit, float) and limit == 1.0)
    if not every_batch or quick is True or (isinstance(quick, int) and quick > 0):
        key, value = ("limit_predict_batches", limit) if not every_batch else ("fast_dev_run", quick)
        raise ConfigError(f"trainer.{key}={value}: predict does every image; leave it unset")
    strategy = str(settings.get("strategy", "auto"))
    if strategy not in ("auto", "ddp", "ddp_spawn"):
        raise ConfigError(f"trainer.strategy={strategy}: predict runs with auto (one process) or ddp (processes)")
    counts = {key: settings.get(key, 1) for key in ("devices", "num_nodes")}
    for key, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"trainer.{key}={value}: expected a whole number of CPU processes >= 1")
    processes = counts["devices"] * counts["num_nodes"]
    return instantiate(
        settings,
        accelerator="cpu",
        strategy="ddp_spawn" if strategy != "auto" or processes > 1 else "auto",
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
