"""Export a model (or an ensemble) to ONNX, TorchScript or safetensors, with its metadata beside it.

python -m covidseg.export ckpt_path=<ckpt|pretrained|list|k-fold folder> format=onnx|torchscript|safetensors
    [output=DIR] [threshold=T] [presence_threshold=P] [flip_tta=true] [min_region_share=S]

Beside the file: its metadata ``.json`` and a ``MODEL_CARD.md`` (:mod:`covidseg.model_card`).
ONNX and TorchScript hold the whole Predictor: every network of an ensemble, the resizing to each
network's side, flip TTA, lung restriction and the presence gate. The ``.json`` beside the file
says how to feed it and read it, and carries the model spec (plain data, validated on load) with
the settings applied to the graph's probabilities: the threshold and ``min_region_share``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import hydra
import torch
import yaml
from omegaconf import DictConfig
from rich.console import Console
from safetensors.torch import save_file
from torch import nn

from covidseg import CONF_DIR
from covidseg.data import DataError
from covidseg.data.index import printable
from covidseg.errors import hydra_errors_in_one_line, user_errors
from covidseg.loader import LoadedModel, inference_overrides, load_predictor
from covidseg.model_card import render_model_card
from covidseg.model_spec import ExportMetadata, ModelFileError, ModelSpec
from covidseg.predictor import Predictor
from covidseg.run_files import make_output_folder

INPUT = "image, float32 (N, 1, S, S): grayscale / 255, resized to S x S (S = model.image_size) with area interpolation"


class TracedPredictor(nn.Module):
    """The Predictor's probabilities and, with presence heads, presence: a graph's outputs."""

    def __init__(self, predictor: Predictor) -> None:
        super().__init__()
        self.predictor = predictor.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        probability, presence = self.predictor(images)
        return probability if presence is None else (probability, presence)


def outputs(predictor: Predictor) -> list[str]:
    return ["probability", "presence"] if predictor.has_presence else ["probability"]


def write_metadata(path: Path, file_format: str, loaded: LoadedModel) -> Path:
    """``<path>.json``: input, outputs and the model spec."""
    metadata = ExportMetadata(
        format=file_format, input=INPUT, outputs=outputs(loaded.predictor), model=loaded.spec.to_plain()
    )
    meta_path = path.with_suffix(".json")
    meta_path.write_text(json.dumps(metadata.model_dump(mode="json"), indent=2) + "\n")
    return meta_path


def _example(spec: ModelSpec) -> torch.Tensor:
    return torch.rand(2, 1, spec.image_size, spec.image_size)


def trace_onnx(predictor: Predictor, example: torch.Tensor, path: Path) -> Path:
    """The whole Predictor as an ONNX graph with a dynamic batch dimension (TorchScript-based
    exporter: no onnxscript needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    names = outputs(predictor)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            TracedPredictor(predictor),
            (example,),
            str(path),
            input_names=["image"],
            output_names=names,
            dynamic_axes={name: {0: "batch"} for name in ["image", *names]},
            dynamo=False,
        )
    return path


def export_onnx(loaded: LoadedModel, path: Path) -> Path:
    """ONNX of the Predictor plus its metadata ``.json``."""
    trace_onnx(loaded.predictor, _example(loaded.spec), path)
    write_metadata(path, "onnx", loaded)
    return path


def export_torchscript(loaded: LoadedModel, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace(TracedPredictor(loaded.predictor), _example(loaded.spec))
    traced.save(str(path))
    write_metadata(path, "torchscript", loaded)
    return path


def export_safetensors(loaded: LoadedModel, path: Path) -> Path:
    """fp16 weights of every network (safetensors: nothing to unpickle) with the model spec as
    ``.yaml`` beside them; ``ckpt_path`` accepts the result like a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().half().contiguous() for name, tensor in loaded.predictor.state_dict().items()}
    save_file(state, str(path))
    path.with_suffix(".yaml").write_text(yaml.safe_dump(loaded.spec.to_plain(), sort_keys=False))
    write_metadata(path, "safetensors", loaded)
    return path


EXPORTERS = {
    "onnx": (export_onnx, ".onnx"),
    "torchscript": (export_torchscript, ".pt"),
    "safetensors": (export_safetensors, ".safetensors"),
}


def check_output(output: Path, file_format: str) -> None:
    """A folder, new or existing, that holds none of the files the export writes: an export never
    replaces a file (the default output, the run's own folder, is always new)."""
    if output.exists() and not output.is_dir():
        raise DataError(f"output {printable(output)!r} is an existing file; expected a folder (new or existing)")
    written = [f"model{EXPORTERS[file_format][1]}", "model.json", "MODEL_CARD.md"]
    written += ["model.yaml"] if file_format == "safetensors" else []
    taken = [name for name in written if (output / name).exists() or (output / name).is_symlink()]
    if taken:
        raise DataError(
            f"output {printable(output)!r} already holds {', '.join(taken)}: an export never replaces files; "
            "choose a new folder"
        )


def export(cfg: DictConfig) -> Path:
    """Export what ``cfg.ckpt_path`` names to ``cfg.output`` in ``cfg.format``, with the metadata
    ``.json`` and a ``MODEL_CARD.md`` beside it; returns the model file."""
    if cfg.format not in EXPORTERS:
        raise ModelFileError(f"format={cfg.format!r} is not one of {', '.join(EXPORTERS)}")
    check_output(Path(cfg.output), cfg.format)
    loaded = load_predictor(cfg.ckpt_path, cfg.paths.log_dir, **inference_overrides(cfg))
    exporter, suffix = EXPORTERS[cfg.format]
    path = exporter(loaded, make_output_folder(Path(cfg.output)) / f"model{suffix}")
    files = sorted(file.name for file in path.parent.glob(f"{path.stem}.*"))
    card = path.parent / "MODEL_CARD.md"
    card.write_text(render_model_card(loaded.spec, loaded.paths[0].stem, files))
    Console().print(f"exported {path}, {path.with_suffix('.json')} and {card}", markup=False, highlight=False)
    return path


@hydra_errors_in_one_line
@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="export")
def main(cfg: DictConfig) -> None:
    with user_errors():
        export(cfg)


if __name__ == "__main__":
    main()
