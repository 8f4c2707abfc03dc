"""Segment any X-ray: masks, overlays and a CSV of infected areas.

python -m covidseg.predict ckpt_path=<ckpt|pretrained|model.onnx> input=<file|folder|glob> output=<dir>
"""

from __future__ import annotations

import csv
import glob
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from rich.console import Console
from rich.progress import track

from covidseg.checkpoints import CheckpointError, module_from_checkpoint, resolve_ckpt_path
from covidseg.data.decode import read_gray, resize_image
from covidseg.data.index import IMAGE_SUFFIXES, DataError
from covidseg.export import export_onnx, read_metadata
from covidseg.reporting import user_errors, write_run_info
from covidseg.visualize import PREDICTION_COLOR, overlay

log = logging.getLogger(__name__)
Backend = Callable[[np.ndarray], np.ndarray]  # (N, 1, S, S) float32 in [0, 1] -> logits (N, T, S, S)


def find_inputs(pattern: str) -> tuple[list[Path], Path]:
    """Image files named by a file, a folder (searched recursively) or a glob, and their common base."""
    path = Path(pattern).expanduser()
    if path.is_file():
        files, base = [path], path.parent
    elif path.is_dir():
        files, base = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES), path
    else:
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        base = Path(*Path(glob.escape(str(path))).parts[: _first_magic_part(path)]) if files else path.parent
    if not files:
        raise DataError(f"input {pattern!r} names no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files, base


def _first_magic_part(path: Path) -> int:
    return next((index for index, part in enumerate(path.parts) if glob.has_magic(part)), len(path.parts))


def check_output(output: Path, inputs: Sequence[Path], input_pattern: str, allow_inside: bool) -> None:
    """Outputs never overwrite inputs, and by default never land inside the input folder."""
    input_dir = Path(input_pattern).expanduser()
    if input_dir.is_dir() and output.resolve().is_relative_to(input_dir.resolve()) and not allow_inside:
        raise DataError(
            f"output {str(output)!r} is inside the input folder {str(input_dir)!r}; choose another output "
            "or set allow_output_in_input=true"
        )


def torch_backend(module: torch.nn.Module) -> Backend:
    def run(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(images)).float().numpy()

    return run


def onnx_backend(path: Path) -> Backend:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda images: session.run(None, {name: images})[0]


def load_backend(cfg: DictConfig, output: Path) -> tuple[Backend, dict]:
    """The model as a function of a batch, and its metadata (image size, targets, threshold)."""
    path = resolve_ckpt_path(cfg.ckpt_path, cfg.paths.log_dir, "train")
    if path.suffix == ".onnx":
        return onnx_backend(path), read_metadata(path)
    module, config = module_from_checkpoint(path)
    if cfg.backend == "onnx":
        onnx_path = export_onnx(module, config, output / "model.onnx")
        return onnx_backend(onnx_path), read_metadata(onnx_path)
    if cfg.backend != "torch":
        raise CheckpointError(f"backend={cfg.backend!r} is not one of torch, onnx")
    meta = {"image_size": config["data"]["image_size"], "targets": config["data"]["targets"]}
    return torch_backend(module), meta | {"threshold": config["model"]["threshold"]}


def predict(cfg: DictConfig) -> Path:
    """Write mask, overlay (and optional probability) PNGs per image and ``predictions.csv``."""
    files, base = find_inputs(str(cfg.input))
    output = Path(cfg.output)
    check_output(output, files, str(cfg.input), cfg.allow_output_in_input)
    output.mkdir(parents=True, exist_ok=True)
    backend, meta = load_backend(cfg, output)
    size, targets = meta["image_size"], meta["targets"]
    threshold = cfg.threshold if cfg.threshold is not None else meta["threshold"]
    channel = targets.index("infection") if "infection" in targets else 0
    input_set = {p.resolve() for p in files}
    rows, skipped = [], []
    batches = [files[start : start + cfg.batch_size] for start in range(0, len(files), cfg.batch_size)]
    for batch in track(batches, description="predicting", console=Console(stderr=True)):
        started = time.perf_counter()
        images, readable = [], []
        for path in batch:
            try:
                images.append(read_gray(path))
                readable.append(path)
            except (DataError, OSError) as error:
                skipped.append((path, str(error)))
        if not images:
            continue
        stacked = np.stack([resize_image(image, size) for image in images])[:, None].astype(np.float32) / 255
        probabilities = 1 / (1 + np.exp(-backend(stacked)[:, channel]))
        seconds = (time.perf_counter() - started) / len(images)
        for path, image, probability in zip(readable, images, probabilities, strict=True):
            rows.append(_write_outputs(path, base, output, image, probability, threshold, cfg.save_probability,
                                       input_set, seconds))  # fmt: skip
    csv_path = output / "predictions.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["file"])
        writer.writeheader()
        writer.writerows(rows)
    for path, reason in skipped:
        log.warning("skipped %s: %s", path, reason)
    Console().print(f"{len(rows)} image(s) predicted, {len(skipped)} skipped; results in {output}", highlight=False)
    return csv_path


def _write_outputs(path, base, output, image, probability, threshold, save_probability, input_set, seconds) -> dict:
    height, width = image.shape
    probability = cv2.resize(probability, (width, height), interpolation=cv2.INTER_LINEAR)
    mask = probability > threshold
    stem = output / path.relative_to(base).with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = {
        stem.with_name(stem.name + "_mask.png"): mask.astype(np.uint8) * 255,
        stem.with_name(stem.name + "_overlay.png"): cv2.cvtColor(
            overlay(image, mask, PREDICTION_COLOR), cv2.COLOR_RGB2BGR
        ),
    }
    if save_probability:
        written[stem.with_name(stem.name + "_probability.png")] = (probability * 255).round().astype(np.uint8)
    for target, array in written.items():
        if target.resolve() in input_set:
            raise DataError(f"refusing to overwrite the input {str(target)!r}")
        cv2.imwrite(str(target), array)
    infected = int(mask.sum())
    return {
        "file": str(path),
        "width": width,
        "height": height,
        "infected_pixels": infected,
        "infected_percent": round(100 * infected / mask.size, 4),
        "mean_probability": round(float(probability[mask].mean()) if infected else 0.0, 4),
        "seconds": round(seconds, 4),
    }


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    with user_errors():
        write_run_info(cfg.paths.output_dir)
        predict(cfg)


if __name__ == "__main__":
    main()
