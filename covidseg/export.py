"""Export a trained model to ONNX or TorchScript, with a metadata file beside it.

python -m covidseg.export ckpt_path=<ckpt|pretrained> format=onnx|torchscript|safetensors [output=DIR]
    [threshold=T] [presence_threshold=P]   (eval-time settings recorded in, or baked into, the export)
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import hydra
import torch
import yaml
from omegaconf import DictConfig
from rich.console import Console
from safetensors.torch import save_file

from covidseg.checkpoints import CheckpointError, eval_options, module_from_checkpoint, resolve_ckpt_path
from covidseg.reporting import user_errors


def metadata(config: dict[str, Any], file_format: str) -> dict[str, Any]:
    """What a runtime needs to feed the model and read its output."""
    return {
        "format": file_format,
        "input": "image, float32 (N, 1, S, S): grayscale / 255, resized to S x S with area interpolation",
        "output": "logits, float32 (N, T, S, S): one channel per target; sigmoid > threshold is positive",
        "image_size": config["data"]["image_size"],
        "targets": config["data"]["targets"],
        "threshold": config["model"]["threshold"],
        "metrics": config.get("metrics", {}),
    }


def _example(module: torch.nn.Module, config: dict[str, Any]) -> torch.Tensor:
    size = config["data"]["image_size"]
    return torch.rand(2, getattr(module.net, "in_channels", 1), size, size)


def export_onnx(module: torch.nn.Module, config: dict[str, Any], path: Path) -> Path:
    """ONNX with a dynamic batch dimension (TorchScript-based exporter: no onnxscript needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        module.to_onnx(
            path,
            _example(module, config),
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            dynamo=False,
        )
    path.with_suffix(".json").write_text(json.dumps(metadata(config, "onnx"), indent=2) + "\n")
    return path


def export_torchscript(module: torch.nn.Module, config: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        module.eval().to_torchscript(path, method="trace", example_inputs=_example(module, config))
    path.with_suffix(".json").write_text(json.dumps(metadata(config, "torchscript"), indent=2) + "\n")
    return path


def export_safetensors(module: torch.nn.Module, config: dict[str, Any], path: Path) -> Path:
    """fp16 weights (safetensors: nothing to unpickle) with the model/data config as ``.yaml`` beside
    them; ``ckpt_path`` accepts the result like a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().half().contiguous() for name, tensor in module.state_dict().items()}
    save_file(state, str(path))
    data = {
        key: value
        for key, value in config["data"].items()
        if key in ("image_size", "targets", "classes", "eval_classes")
    }
    kept = {"model": config["model"], "data": data} | ({"metrics": config["metrics"]} if "metrics" in config else {})
    path.with_suffix(".yaml").write_text(yaml.safe_dump(kept, sort_keys=False))
    path.with_suffix(".json").write_text(json.dumps(metadata(config, "safetensors"), indent=2) + "\n")
    return path


def read_metadata(path: Path) -> dict[str, Any]:
    meta_path = Path(path).with_suffix(".json")
    if not meta_path.is_file():
        raise CheckpointError(f"{str(path)!r} has no metadata file {str(meta_path)!r}: export it with covidseg.export")
    return json.loads(meta_path.read_text())


EXPORTERS = {
    "onnx": (export_onnx, ".onnx"),
    "torchscript": (export_torchscript, ".pt"),
    "safetensors": (export_safetensors, ".safetensors"),
}


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    with user_errors():
        if cfg.format not in EXPORTERS:
            raise CheckpointError(f"format={cfg.format!r} is not one of {', '.join(EXPORTERS)}")
        ckpt_path = resolve_ckpt_path(cfg.ckpt_path, cfg.paths.log_dir, "train")
        module, config = module_from_checkpoint(ckpt_path, **eval_options(cfg))
        exporter, suffix = EXPORTERS[cfg.format]
        path = exporter(module, config, Path(cfg.output) / f"model{suffix}")
        Console().print(f"exported {path} and {path.with_suffix('.json')}", highlight=False)


if __name__ == "__main__":
    main()
