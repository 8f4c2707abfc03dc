"""Export a model (or an ensemble) to ONNX, TorchScript or safetensors, with its metadata beside it.

python -m covidseg.export ckpt_path=<ckpt|pretrained|list|k-fold folder> format=onnx|torchscript|safetensors
    [output=DIR] [threshold=T] [presence_threshold=P] [flip_tta=true] [min_region_share=S]
    [int8_calibration=<X-rays> [int8_presence_threshold=P]]  (safetensors: the file carries int8 ranges for
    OpenVINO, and the presence gate the int8 model runs at)

Beside the file: its metadata ``.json`` and a ``MODEL_CARD.md`` (:mod:`covidseg.reports.model_card`).
ONNX and TorchScript hold the whole Predictor: every network of an ensemble, the resizing to each
network's side, flip TTA, lung restriction and the presence gate. The ``.json`` beside the file
says how to feed it and read it, and carries the model spec (plain data, validated on load) with
the settings applied to the graph's probabilities: the threshold and ``min_region_share``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from rich.console import Console

from covidseg.core.config import CONF_DIR, check_output_folder
from covidseg.core.errors import ConfigError, DataError, ModelFileError, hydra_errors_in_one_line, user_errors
from covidseg.core.files import printable
from covidseg.core.run_files import make_output_folder
from covidseg.core.writing import exclusive_lock, write_atomic
from covidseg.inference.exporters import EXPORTERS, cached_onnx, round_to_stored_precision
from covidseg.inference.loader import (
    LoadedModel,
    allow_missing_folds,
    inference_overrides,
    int8_operating_point,
    load_predictor,
)
from covidseg.inference.model_spec import Int8Spec
from covidseg.inference.quantize import calibration_setting, int8_versions, shippable_ranges
from covidseg.reports.model_card import render_model_card

log = logging.getLogger(__name__)


def written_files(file_format: str) -> list[str]:
    """The names an export in ``file_format`` writes into its folder."""
    return [f"model{EXPORTERS[file_format][1]}", "model.json", "MODEL_CARD.md"] + (
        ["model.yaml"] if file_format == "safetensors" else []
    )


def check_output(output: Path, file_format: str) -> None:
    """A folder, new or existing, that holds none of the files the export writes: an export never
    replaces a file (the default output, the run's own folder, is always new)."""
    if output.exists() and not output.is_dir():
        raise DataError(f"output {printable(output)!r} is an existing file; expected a folder (new or existing)")
    taken = [name for name in written_files(file_format) if (output / name).exists() or (output / name).is_symlink()]
    if taken:
        raise DataError(
            f"output {printable(output)!r} already holds {', '.join(taken)}: an export never replaces files; "
            "choose a new folder"
        )


def export(cfg: DictConfig) -> Path:
    """Export what ``cfg.ckpt_path`` names to ``cfg.output`` in ``cfg.format``, with the metadata
    ``.json`` and a ``MODEL_CARD.md`` beside it; returns the model file. Every file is written whole,
    under a lock on the folder; when one cannot be, none of the export's files is left."""
    if cfg.format not in EXPORTERS:
        raise ModelFileError(f"format={cfg.format!r} is not one of {', '.join(EXPORTERS)}")
    # the folder the path names once its links and ".." are followed: "<new>/../<yours>" is yours
    output = Path(os.path.realpath(Path(str(cfg.output)).expanduser()))
    check_output(output, cfg.format)
    calibration, gate = int8_settings(cfg)
    overrides = inference_overrides(cfg)
    loaded = load_predictor(cfg.ckpt_path, cfg.paths.log_dir, allow_missing_folds=allow_missing_folds(cfg), **overrides)
    if calibration is not None:
        loaded = with_int8_ranges(loaded, calibration, Path(cfg.paths.cache_dir), gate)
    elif loaded.spec.int8 is not None and (changed := int8_operating_point(loaded, overrides)[1]):
        log.info("the model's int8 ranges are left out of the export: they do not fit %s", changed)
        loaded = dataclasses.replace(loaded, spec=loaded.spec.without_int8(), int8_ranges=None)
    exporter, suffix = EXPORTERS[cfg.format]
    with exclusive_lock(make_output_folder(output)) as locked:
        if not locked:
            raise DataError(
                f"output {printable(output)!r} is being written by another covidseg command: choose another folder"
            )
        check_output(output, cfg.format)  # again, now that no other export can write here
        try:
            path = exporter(loaded, output / f"model{suffix}")
            files = sorted(file.name for file in output.glob(f"{path.stem}.*"))
            spec = loaded.spec if cfg.format == "safetensors" else loaded.spec.without_int8()  # a graph holds none
            card = write_atomic(output / "MODEL_CARD.md", render_model_card(spec, loaded.paths[0].stem, files))
        except BaseException:
            for name in written_files(cfg.format):  # none was there before (checked under the lock)
                (output / name).unlink(missing_ok=True)
            raise
    Console().print(f"exported {path}, {path.with_suffix('.json')} and {card}", markup=False, highlight=False)
    if loaded.spec.int8 is not None:
        Console().print(
            f"with int8 ranges ({loaded.spec.int8.calibration}); measure them: python -m covidseg.eval "
            f"ckpt_path={path} backend=openvino_int8 data.root=...",
            markup=False,
            highlight=False,
        )
    return path


def int8_settings(cfg: DictConfig) -> tuple[str | None, float | None]:
    """``int8_calibration`` and ``int8_presence_threshold``, checked before a model is read."""
    calibration, gate = cfg.get("int8_calibration"), cfg.get("int8_presence_threshold")
    if calibration is not None:
        calibration_setting(calibration)
        if cfg.format != "safetensors":
            raise ConfigError(
                f"int8_calibration: int8 ranges travel in a safetensors model file, not format={cfg.format}"
            )
    if gate is not None:
        if calibration is None:
            raise ConfigError(f"int8_presence_threshold={gate!r}: the gate of an int8 model; give int8_calibration too")
        if isinstance(gate, bool) or not isinstance(gate, int | float) or not 0 < gate < 1:
            raise ConfigError(f"int8_presence_threshold={gate!r}: expected a number between 0 and 1")
    return calibration, gate


def with_int8_ranges(
    loaded: LoadedModel, calibration: str, cache_dir: Path, presence_threshold: float | None = None
) -> LoadedModel:
    """``loaded`` with the int8 ranges of its ONNX graph calibrated on ``calibration``'s X-rays, the
    int8 model gated at ``presence_threshold`` where it is given (int8 moves the presence
    probability; choose it on Val), else at the model's own gate. The weights are rounded to fp16
    first, as the safetensors file keeps them, so the ranges are those of the graph the written file
    makes."""
    round_to_stored_precision(loaded.predictor)
    settings = loaded.spec.inference
    gate = settings.presence_threshold if presence_threshold is None else presence_threshold
    if gate is not None and not loaded.spec.has_presence:
        raise ConfigError(f"int8_presence_threshold={gate}: this model has no presence head to gate by")
    versions = int8_versions()
    placeholder = Int8Spec(quantizers=1, digest="0" * 64, presence_threshold=gate, flip_tta=settings.flip_tta,
                           restrict_to_lungs=settings.restrict_to_lungs, versions=versions)  # fmt: skip
    measured = dataclasses.replace(loaded, spec=loaded.spec.model_copy(update={"int8": placeholder}))
    gated, _ = int8_operating_point(measured, {})
    ranges, digest, count = shippable_ranges(cached_onnx(gated, cache_dir), calibration, loaded.spec.image_size)
    described = f"{count} X-rays of {printable(calibration)}"[:500]
    found = {"quantizers": len(ranges), "digest": digest, "calibration": described}
    spec = loaded.spec.without_int8().model_copy(update={"int8": Int8Spec(**placeholder.model_dump() | found)})
    return dataclasses.replace(loaded, spec=spec, int8_ranges=torch.from_numpy(ranges))  # earlier int8 metrics gone


@hydra_errors_in_one_line
@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="export")
def main(cfg: DictConfig) -> None:
    with user_errors():
        check_output_folder(cfg)  # this run's own folder, before anything is written
        export(cfg)


if __name__ == "__main__":
    main()
