"""Segment any X-ray: masks, overlays and a CSV of infected areas.

python -m covidseg.predict ckpt_path=<ckpt|pretrained|list|k-fold folder|model.onnx> \
    input=<file|folder|glob> output=<dir>
"""

from __future__ import annotations

import csv
import glob
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from rich.console import Console
from rich.progress import track

from covidseg.data.decode import read_gray, resize_image
from covidseg.data.index import IMAGE_SUFFIXES, DataError, printable
from covidseg.errors import user_errors
from covidseg.export import export_onnx
from covidseg.loader import (
    inference_bf16,
    inference_overrides,
    load_predictor,
    read_onnx_metadata,
    resolve_model_paths,
)
from covidseg.model_spec import ModelFileError, ModelSpec
from covidseg.predictor import Predictor
from covidseg.run_files import write_run_info
from covidseg.severity import severity
from covidseg.visualize import LUNG_COLOR, PREDICTION_COLOR, outline, overlay

log = logging.getLogger(__name__)
SOME_IMAGES_FAILED = 3  # exit code: the run finished, but some images could not be read or written
# (N, 1, S, S) float32 in [0, 1] -> probabilities (N, T, S, S) and presence probabilities (N,) or None
Backend = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]


def _walk(folder: Path) -> list[Path]:
    """Image files below ``folder``; symlinked folders are not entered, so a loop cannot be followed."""
    files = []
    for root, folders, names in os.walk(folder, followlinks=False):
        folders.sort()
        files += [Path(root, name) for name in sorted(names) if Path(name).suffix.lower() in IMAGE_SUFFIXES]
    return files


def _first_magic_part(path: Path) -> int:
    return next((index for index, part in enumerate(path.parts) if glob.has_magic(part)), len(path.parts))


def find_inputs(pattern: str) -> tuple[list[Path], Path]:
    """Image files named by a file, a folder (searched recursively) or a glob, and their common base.

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
        raise DataError(f"input {printable(pattern)!r} names no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files, base


def output_stem(output: Path, path: Path, base: Path) -> Path:
    """``<output>/<path relative to base>``, suffix kept, so ``x.png`` and ``x.jpg`` stay apart."""
    return output / path.relative_to(base)


def check_output(output: Path, files: list[Path], base: Path, recursive: bool, allow_inside: bool) -> None:
    """The output is a folder; unless ``allow_output_in_input``, no output lands in a folder that holds
    an input file, nor anywhere below a folder searched recursively (a later run would read it back).
    Inputs themselves are never overwritten (see :meth:`ImageOutputs.write`)."""
    if output.exists() and not output.is_dir():
        raise DataError(f"output {printable(output)!r} is an existing file; expected a folder (new or existing)")
    if allow_inside:
        return
    if recursive and output.resolve().is_relative_to(base.resolve()):
        raise DataError(
            f"output {printable(output)!r} is inside the input folder {printable(base)!r}; choose another output "
            "or set allow_output_in_input=true"
        )
    input_folders = {
        folder for path in files for folder in (path.parent.resolve(), Path(os.path.realpath(path)).parent)
    }
    for path in files:
        folder = output_stem(output, path, base).parent.resolve()
        if folder in input_folders:
            raise DataError(
                f"output {printable(output)!r} would write into {printable(folder)!r}, which holds input files; "
                "choose another output or set allow_output_in_input=true"
            )


def torch_backend(predictor: Predictor) -> Backend:
    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        prediction = predictor.predict(torch.from_numpy(images))
        presence = None if prediction.presence is None else prediction.presence.numpy()
        return prediction.probability.numpy(), presence

    return run


def onnx_backend(path: Path) -> Backend:
    import onnxruntime

    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own types for corrupt or unsupported graphs
        first_line = (str(error).splitlines() or [type(error).__name__])[0][:200]
        raise ModelFileError(f"{printable(path)!r} is not an ONNX graph ONNX Runtime can run: {first_line}") from None
    name = session.get_inputs()[0].name

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        probability, *presence = session.run(None, {name: images})
        return probability, presence[0] if presence else None

    return run


def load_backend(cfg: DictConfig, output: Path) -> tuple[Backend, ModelSpec]:
    """The model as a function of a batch, and its spec (image size, targets, threshold)."""
    paths = resolve_model_paths(cfg.ckpt_path, cfg.paths.log_dir)
    overrides = inference_overrides(cfg)
    if any(path.suffix == ".onnx" for path in paths):
        if len(paths) > 1:
            raise ModelFileError("an exported .onnx graph runs alone: export the ensemble as one graph instead")
        baked = sorted(key for key, value in overrides.items() if key != "threshold" and value is not None)
        if baked:
            raise ModelFileError(f"{', '.join(baked)} cannot change an exported .onnx graph: export again with them")
        _, spec = read_onnx_metadata(paths[0])
        return onnx_backend(paths[0]), spec.with_inference(threshold=overrides["threshold"])
    bf16 = inference_bf16(cfg) and cfg.backend == "torch"  # an ONNX export is traced in fp32
    loaded = load_predictor([str(path) for path in paths], cfg.paths.log_dir, bf16, **overrides)
    if cfg.backend == "onnx":
        return onnx_backend(export_onnx(loaded, output / "model.onnx")), loaded.spec
    if cfg.backend != "torch":
        raise ModelFileError(f"backend={cfg.backend!r} is not one of torch, onnx")
    return torch_backend(loaded.predictor), loaded.spec


@dataclass
class PredictRun:
    """What ``predict`` did: the CSV, the rows written, and the images it could not read or write."""

    csv_path: Path
    rows: list[dict] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # unreadable inputs
    failed: list[tuple[Path, str]] = field(default_factory=list)  # outputs that could not be written


def predict(cfg: DictConfig) -> PredictRun:
    """Write mask, overlay (and optional probability) PNGs per image and ``predictions.csv``."""
    files, base = find_inputs(str(cfg.input))
    output = Path(cfg.output)
    recursive = Path(str(cfg.input)).expanduser().is_dir() or "**" in str(cfg.input)
    check_output(output, files, base, recursive, cfg.allow_output_in_input)
    backend, spec = load_backend(cfg, output)
    output.mkdir(parents=True, exist_ok=True)
    size, targets, threshold = spec.image_size, spec.targets, spec.inference.threshold
    channel = targets.index("infection") if "infection" in targets else 0
    lung_channel = targets.index("lung") if "lung" in targets and len(targets) > 1 else None
    inputs = {Path(os.path.realpath(path)) for path in files}
    run = PredictRun(output / "predictions.csv")
    batches = [files[start : start + cfg.batch_size] for start in range(0, len(files), cfg.batch_size)]
    for batch in track(batches, description="predicting", console=Console(stderr=True)):
        started = time.perf_counter()
        images, readable = [], []
        for path in batch:
            try:
                images.append(read_gray(path))
                readable.append(path)
            except (DataError, OSError) as error:
                run.skipped.append((path, str(error)))
        if not images:
            continue
        stacked = np.stack([resize_image(image, size) for image in images])[:, None].astype(np.float32) / 255
        probabilities, presences = backend(stacked)
        seconds = (time.perf_counter() - started) / len(images)
        for index, (path, image, probability) in enumerate(zip(readable, images, probabilities, strict=True)):
            lung = probability[lung_channel] if lung_channel is not None else None
            outputs = ImageOutputs(path, image, probability[channel], lung, threshold)
            try:
                row = outputs.write(output_stem(output, path, base), cfg.save_probability, inputs)
            except (DataError, OSError) as error:
                run.failed.append((path, str(error)))
                continue
            if presences is not None:
                row["presence_probability"] = round(float(presences[index]), 4)
            run.rows.append(row | {"seconds": round(seconds, 4)})
    with run.csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(run.rows[0]) if run.rows else ["file"])
        writer.writeheader()
        writer.writerows(run.rows)
    for label, problems in (("skipped (unreadable)", run.skipped), ("failed (not written)", run.failed)):
        for path, reason in problems:
            log.warning("%s %s: %s", label, printable(path), reason)
    Console().print(
        f"{len(run.rows)} image(s) predicted, {len(run.skipped)} skipped, {len(run.failed)} failed; "
        f"results in {printable(output)}",
        markup=False,
        highlight=False,
    )
    return run


def write_png(path: Path, array: np.ndarray) -> None:
    """Encode in memory, write a new temporary file beside ``path``, then rename it over ``path``."""
    encoded, data = cv2.imencode(".png", array)
    if not encoded:
        raise OSError(f"could not encode {printable(path)!r} as PNG")
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data.tobytes())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)  # the file mkstemp created above, never renamed
        raise


class ImageOutputs:
    """One image's masks at its own size, the files drawn from them and its CSV row."""

    def __init__(
        self, path: Path, image: np.ndarray, probability: np.ndarray, lung: np.ndarray | None, threshold: float
    ) -> None:
        height, width = image.shape
        self.path, self.image = path, image
        self.probability = cv2.resize(probability, (width, height), interpolation=cv2.INTER_LINEAR)
        self.mask = self.probability > threshold
        self.lung = None
        if lung is not None:
            self.lung = cv2.resize(lung, (width, height), interpolation=cv2.INTER_LINEAR) > threshold

    def write(self, stem: Path, save_probability: bool, inputs: set[Path]) -> dict:
        """Write ``<stem>.mask.png``, ``.overlay.png`` (and ``.probability.png``, ``.lung.png``), each
        through a temporary file, so a failed write leaves no half or stale-looking output."""
        stem.parent.mkdir(parents=True, exist_ok=True)
        drawn = overlay(self.image, self.mask, PREDICTION_COLOR)
        files = {"mask": self.mask.astype(np.uint8) * 255}
        if self.lung is not None:
            files["lung"] = self.lung.astype(np.uint8) * 255
            outline(drawn, self.lung, LUNG_COLOR)
        files["overlay"] = cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR)
        if save_probability:
            files["probability"] = (self.probability * 255).round().astype(np.uint8)
        for suffix, array in files.items():
            target = stem.with_name(f"{stem.name}.{suffix}.png")
            if Path(os.path.realpath(target)) in inputs:
                raise DataError(f"refusing to overwrite the input {printable(target)!r}")
            write_png(target, array)
        return self.row()

    def row(self) -> dict:
        height, width = self.image.shape
        infected = int(self.mask.sum())
        row = {
            "file": printable(self.path),
            "width": width,
            "height": height,
            "infected_pixels": infected,
            "infected_percent": round(100 * infected / self.mask.size, 4),
            "mean_probability": round(float(self.probability[self.mask].mean()) if infected else 0.0, 4),
        }
        if self.lung is not None:
            row |= {key: round(value, 4) for key, value in severity(self.lung, self.mask).items()}
        return row


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    with user_errors():
        write_run_info(cfg.paths.output_dir)
        run = predict(cfg)
    if run.skipped or run.failed:
        sys.exit(SOME_IMAGES_FAILED)


if __name__ == "__main__":
    main()
