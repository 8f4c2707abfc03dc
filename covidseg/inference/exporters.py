"""A loaded model as files other runtimes read: ONNX and TorchScript of the whole Predictor, or
fp16 safetensors with the model spec as ``.yaml``; each with its metadata ``.json`` beside it.

ONNX and TorchScript hold every network of an ensemble, the resizing to each network's side, flip
TTA, lung restriction and the presence gate; the ``.json`` says how to feed the graph and read it,
and carries the model spec (plain data, validated on load). Each file is written whole or not at
all (:mod:`covidseg.core.writing`). The ``export`` command writes these
into a folder with a model card; ``segment`` traces an ONNX graph of a Predictor to run it in ONNX
Runtime.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from pathlib import Path

import torch
import yaml
from safetensors.torch import save as save_safetensors
from torch import nn

import covidseg
from covidseg.core.writing import write_atomic
from covidseg.inference.loader import LoadedModel
from covidseg.inference.model_spec import APPLIED_AFTER_GRAPH, INT8_RANGES, ExportMetadata, ModelSpec
from covidseg.inference.predictor import Predictor

INPUT = "image, float32 (N, 1, S, S): grayscale / 255, resized to S x S (S = model.image_size) with area interpolation"


class TracedPredictor(nn.Module):
    """The Predictor's probabilities and, where the model has them, presence and x-ray scores: a
    graph's outputs (named by the spec's ``graph_outputs``), always traced in fp32 (a Predictor loaded for bf16
    inference would put bf16 casts into the graph)."""

    def __init__(self, predictor: Predictor) -> None:
        super().__init__()
        self.predictor = predictor.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        bf16, self.predictor.bf16 = self.predictor.bf16, False
        try:
            answer = self.predictor(images)
        finally:
            self.predictor.bf16 = bf16
        present = tuple(value for value in answer if value is not None)
        return present[0] if len(present) == 1 else present


def write_metadata(path: Path, file_format: str, loaded: LoadedModel) -> Path:
    """``<path>.json``: input, outputs and the model spec (without int8 ranges beside a graph,
    which does not hold them)."""
    spec = loaded.spec if file_format == "safetensors" else loaded.spec.without_int8()
    metadata = ExportMetadata(format=file_format, input=INPUT, outputs=spec.graph_outputs, model=spec.to_plain())
    return write_atomic(path.with_suffix(".json"), json.dumps(metadata.model_dump(mode="json"), indent=2) + "\n")


def _example(spec: ModelSpec) -> torch.Tensor:
    return torch.rand(2, 1, spec.image_size, spec.image_size)


def trace_onnx(predictor: Predictor, example: torch.Tensor, path: Path, names: list[str]) -> Path:
    """The whole Predictor as an ONNX graph with a dynamic batch dimension and the outputs ``names``
    (its spec's :attr:`~covidseg.inference.model_spec.ModelSpec.graph_outputs`; TorchScript-based
    exporter: no onnxscript needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    graph = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            TracedPredictor(predictor),
            (example,),
            graph,
            input_names=["image"],
            output_names=names,
            dynamic_axes={name: {0: "batch"} for name in ["image", *names]},
            dynamo=False,
        )
    return write_atomic(path, graph.getvalue())


def export_onnx(loaded: LoadedModel, path: Path) -> Path:
    """ONNX of the Predictor plus its metadata ``.json``."""
    trace_onnx(loaded.predictor, _example(loaded.spec), path, loaded.spec.graph_outputs)
    write_metadata(path, "onnx", loaded)
    return path


def cached_onnx(loaded: LoadedModel, cache_dir: Path) -> Path:
    """The ONNX graph of ``loaded``, exported once into ``<cache_dir>/graphs`` and reused by later
    commands (tracing takes seconds, compiling it under half a second). Its name is a digest of the
    weights, what of the model spec the graph holds (networks, side, flip TTA, gate...) and the
    exporter's versions, so another model or setting never finds it."""
    digest = hashlib.sha256()
    for name, tensor in loaded.predictor.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    spec = loaded.spec.to_plain()
    baked = {key: value for key, value in spec["inference"].items() if key not in APPLIED_AFTER_GRAPH}
    graph = {key: spec[key] for key in ("networks", "targets", "image_size", "normalization")} | {"inference": baked}
    versions = {"torch": torch.__version__, "covidseg": covidseg.__version__, "traced": "fp32"}
    digest.update(json.dumps(graph | versions, sort_keys=True, default=str).encode())
    path = Path(cache_dir) / "graphs" / f"{digest.hexdigest()[:32]}.onnx"
    if path.is_file() and path.with_suffix(".json").is_file():
        return path
    return export_onnx(loaded, path)  # written whole or not at all: runs at once write the same graph


def export_torchscript(loaded: LoadedModel, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace(TracedPredictor(loaded.predictor), _example(loaded.spec))
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    write_atomic(path, buffer.getvalue())
    write_metadata(path, "torchscript", loaded)
    return path


def round_to_stored_precision(predictor: Predictor) -> None:
    """The Predictor's weights rounded to fp16 in place, as :func:`export_safetensors` stores them:
    what is measured on them (an x-ray check, int8 ranges) is then what the written file holds."""
    with torch.no_grad():
        for tensor in predictor.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())


def export_safetensors(loaded: LoadedModel, path: Path) -> Path:
    """fp16 weights of every network (safetensors: nothing to unpickle), and the int8 ranges in fp32
    where the spec has them, with the model spec as ``.yaml`` beside them; ``ckpt_path`` accepts the
    result like a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().half().contiguous() for name, tensor in loaded.predictor.state_dict().items()}
    if loaded.spec.int8 is not None:
        assert loaded.int8_ranges is not None, "a spec with int8 ranges needs them"
        state[INT8_RANGES] = loaded.int8_ranges.detach().float().contiguous()
    write_atomic(path, save_safetensors(state))
    write_atomic(path.with_suffix(".yaml"), yaml.safe_dump(loaded.spec.to_plain(), sort_keys=False, allow_unicode=True))
    write_metadata(path, "safetensors", loaded)
    return path


EXPORTERS = {
    "onnx": (export_onnx, ".onnx"),
    "torchscript": (export_torchscript, ".pt"),
    "safetensors": (export_safetensors, ".safetensors"),
}
