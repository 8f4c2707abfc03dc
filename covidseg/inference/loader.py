"""From ``ckpt_path`` to a :class:`~covidseg.inference.predictor.Predictor`: the one way a model file
becomes a model.

``ckpt_path`` takes a ``.ckpt``, ``pretrained`` (the shipped lung + infection model, which grades
severity; also named ``pretrained:lung_infection``), ``pretrained:infection`` (the shipped infection-only
model, the default before), ``last`` (the
newest ``last.ckpt`` of a task), a ``.safetensors`` file with its ``.yaml`` spec beside it, an
export folder, a list (an ensemble) or a finished k-fold multirun folder (an ensemble of its folds'
best checkpoints). Files are read without unpickling objects (``torch.load(weights_only=True)``,
safetensors, YAML's safe loader without aliases); the model spec inside is validated by
:mod:`covidseg.inference.model_spec` and the networks come from covidseg's registry only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors

from covidseg.core.errors import ConfigError, ModelFileError
from covidseg.core.files import open_regular_file, read_file_bytes, read_plain_yaml
from covidseg.core.hardware import cpu_precision
from covidseg.core.run_files import kfold_folds
from covidseg.inference.model_spec import (
    GRAPH_SETTINGS,
    INT8_RANGES,
    SPEC_KEY,
    ExportMetadata,
    ModelSpec,
    parse_export_metadata,
    parse_spec,
    refuse_hydra_keys,
)
from covidseg.inference.predictor import Predictor
from covidseg.inference.xray_check import TENSOR_PREFIX, XrayCheck
from covidseg.models.network import SegmentationNetwork
from covidseg.models.registry import build_network

log = logging.getLogger(__name__)
PRETRAINED_DIR = Path(__file__).resolve().parents[1] / "pretrained"
# the models shipped in the package, by the ckpt_path that names them (each file has its .yaml spec)
PRETRAINED_MODELS = {
    "pretrained": PRETRAINED_DIR / "lung_infection.safetensors",
    "pretrained:lung_infection": PRETRAINED_DIR / "lung_infection.safetensors",
    "pretrained:infection": PRETRAINED_DIR / "best_cpu.safetensors",
}
PRETRAINED = PRETRAINED_MODELS["pretrained"]
MODULE_PREFIX = "network."  # the SegmentationModule's network in a Lightning checkpoint's state_dict
BEST_DICE = re.compile(r"dice(\d+(?:\.\d+)?)")
TASK_NAME = re.compile(r"[A-Za-z0-9_.-]+")


MAX_SPEC_BYTES = 1_000_000  # a model spec or export metadata file is a few kB; larger ones are not read
MAX_MODEL_BYTES = 2 * 1024**3  # covidseg's largest checkpoints (with optimiser state) are a few hundred MB


INFERENCE_KEYS = ("threshold", "presence_threshold", "flip_tta", "restrict_to_lungs", "min_region_share")


def inference_overrides(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The inference settings a command sets (the ``conf/inference`` keys; null keeps the model file's)."""
    return {key: cfg.get(key) for key in INFERENCE_KEYS}


def allow_missing_folds(cfg: Mapping[str, Any]) -> bool:
    """``allow_missing_folds`` of ``conf/inference``: true uses a k-fold folder's finished folds only."""
    choice = cfg.get("allow_missing_folds", False)
    if not isinstance(choice, bool):
        raise ConfigError(f"allow_missing_folds={choice!r}: expected true or false")
    return choice


def xray_check_setting(cfg: Mapping[str, Any]) -> bool:
    """``xray_check`` of predict and serve: true refuses pictures unlike the model's X-rays."""
    choice = cfg.get("xray_check", True)
    if not isinstance(choice, bool):
        raise ConfigError(f"xray_check={choice!r}: expected true (refuse pictures unlike chest X-rays) or false")
    return choice


def inference_bf16(cfg: Mapping[str, Any]) -> bool:
    """``bf16`` of ``conf/inference``: true, false, or null for "where the CPU has native bf16"."""
    choice = cfg.get("bf16")
    if choice is None:
        return cpu_precision() == "bf16-mixed"
    if not isinstance(choice, bool):
        raise ConfigError(f"bf16={choice!r}: expected true, false or null (where the CPU has native bf16)")
    return choice


@dataclass
class LoadedModel:
    """A ready Predictor, the spec it was built from (ensembles: all networks) and its files, and
    the int8 ranges of the file where its spec declares them (:class:`Int8Spec`)."""

    predictor: Predictor
    spec: ModelSpec
    paths: list[Path]
    int8_ranges: torch.Tensor | None = None

    @property
    def description(self) -> str:
        if len(self.paths) == 1:
            return str(self.paths[0])
        return f"ensemble of {len(self.paths)} models ({', '.join(path.name for path in self.paths)})"


def _newest_last(log_dir: str | Path, task_name: str) -> Path:
    if not TASK_NAME.fullmatch(task_name) or task_name in (".", ".."):
        raise ModelFileError(f"ckpt_path=last:{task_name}: a task name is letters, digits, '_', '-' or '.'")
    runs = Path(log_dir, task_name)
    candidates = sorted(runs.glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise ModelFileError(f"ckpt_path=last:{task_name}: no checkpoints/last.ckpt under {str(runs)!r}")
    return candidates[-1]


def names_last(value: str) -> bool:
    """``last`` or ``last:<task>`` (unless a file or folder has that name)."""
    return value == "last" or (value.startswith("last:") and not Path(value).exists())


def resolve_ckpt_path(value: str | None, log_dir: str | Path, task_name: str) -> Path | None:
    """One file: ``None`` stays ``None``; a shipped model's name; ``last`` (the newest
    ``last.ckpt`` of ``task_name``) or ``last:<task>`` (of that task); or a path to an existing file."""
    if value is None:
        return None
    if value in PRETRAINED_MODELS:  # a file or folder of that name is not looked at
        shipped = PRETRAINED_MODELS[value]
        if not shipped.is_file():
            raise ModelFileError(f"ckpt_path={value}: {str(shipped)!r} is not installed")
        return shipped
    if value.startswith("pretrained:") and not Path(value).exists():
        raise ModelFileError(f"ckpt_path={value!r}: the shipped models are {', '.join(PRETRAINED_MODELS)}")
    if names_last(value):
        return _newest_last(log_dir, value.partition(":")[2] or task_name)
    path = Path(value).expanduser()
    if not path.is_file():
        raise ModelFileError(f"ckpt_path {value!r} does not exist or is not a file")
    return path


def best_checkpoint(job_dir: Path) -> Path:
    """The best checkpoint of one training run: the highest ``dice`` in its checkpoint names."""
    scored = [(float(m.group(1)), path) for path in job_dir.glob("checkpoints/*.ckpt")
              if not path.name.startswith(".") and (m := BEST_DICE.search(path.stem))]  # fmt: skip
    if not scored:
        raise ModelFileError(f"{str(job_dir)!r} has no best checkpoint (checkpoints/epoch*-dice*.ckpt)")
    return max(scored)[1]


def resolve_model_paths(
    value: Any, log_dir: str | Path, task_name: str = "train", allow_missing_folds: bool = False
) -> list[Path]:
    """Every model file that ``ckpt_path`` names (several: an ensemble). A k-fold multirun folder
    must hold a finished run of every fold, unless ``allow_missing_folds``."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if not value:
            raise ModelFileError("ckpt_path=[] names no model")
        return [
            path for item in value for path in resolve_model_paths(str(item), log_dir, task_name, allow_missing_folds)
        ]
    if value is None or not str(value).strip():
        raise ModelFileError(
            f"ckpt_path={value!r} names no model: give a .ckpt, pretrained, last, a list or a k-fold multirun folder"
        )
    folder = Path(str(value)).expanduser()
    if str(value) not in PRETRAINED_MODELS and not names_last(str(value)) and folder.is_dir():
        for name in ("model.safetensors", "model.onnx"):  # an export folder
            if (folder / name).is_file():
                return [folder / name]
        jobs = sorted(path.parent for path in folder.glob("*/checkpoints"))
        if jobs and not (folder / "multirun.yaml").is_file():  # a task's runs folder: unrelated runs
            raise ModelFileError(
                f"ckpt_path {str(value)!r} holds runs but is not a multirun (no multirun.yaml): name one "
                "checkpoint, a list of them, or the folder of a k-fold multirun"
            )
        if not jobs:
            raise ModelFileError(
                f"ckpt_path {str(value)!r} is a folder without model.safetensors, model.onnx or */checkpoints/ "
                "(a finished multirun)"
            )
        folds = kfold_folds(jobs, ModelFileError)
        if folds is not None and folds.incomplete and not allow_missing_folds:
            raise ModelFileError(
                f"ckpt_path {str(value)!r} is a k-fold multirun with {folds.describe_missing()}: finish or "
                "remove them, or set allow_missing_folds=true to use the folds that finished"
            )
        return [best_checkpoint(job) for job in (folds.finished if folds is not None else jobs)]
    return [resolve_ckpt_path(str(value), log_dir, task_name)]


def _torch_checkpoint(path: Path) -> dict[str, Any]:
    with open_regular_file(path, MAX_MODEL_BYTES, "a model file", ModelFileError) as file:
        try:
            checkpoint = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as error:  # any failure to read an untrusted file is the user's one-line error
            first_line = (str(error).splitlines() or [type(error).__name__])[0]
            raise ModelFileError(
                f"{str(path)!r} is not a checkpoint covidseg can read without unpickling objects: {first_line[:200]}"
            ) from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ModelFileError(f"{str(path)!r} has no 'state_dict': it is not a covidseg checkpoint")
    return checkpoint


def check_checkpoint(path: Path) -> tuple[dict[str, Any], ModelSpec]:
    """Read a ``.ckpt`` safely and refuse it unless everything in it is plain data with a valid spec
    (also before training resumes from it); returns the checkpoint and its spec."""
    checkpoint = _torch_checkpoint(path)
    refuse_hydra_keys({key: value for key, value in checkpoint.items() if key != "state_dict"}, repr(str(path)))
    if SPEC_KEY not in checkpoint:
        raise ModelFileError(
            f"{str(path)!r}: key {SPEC_KEY!r} is missing: not written by covidseg.train "
            "(a covidseg 0.1 checkpoint: if you trust it, convert it with python -m covidseg.convert)"
        )
    return checkpoint, parse_spec(checkpoint[SPEC_KEY], repr(str(path)))


def _small_file(path: Path) -> bytes:
    """The bytes of a spec or metadata file, refused unread when it is far larger than one can be."""
    return read_file_bytes(path, MAX_SPEC_BYTES, "a model's spec", ModelFileError)


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise ModelFileError(f"{str(path)!r} is missing: a .safetensors model keeps its spec in a .yaml beside it")
    return read_plain_yaml(path, MAX_SPEC_BYTES, "a model's spec", ModelFileError)


def read_model_file(path: Path) -> tuple[ModelSpec, dict[str, torch.Tensor]]:
    """The spec and the Predictor-layout state dict (``networks.<i>.``) of a ``.ckpt`` or ``.safetensors``."""
    if path.suffix == ".safetensors":
        spec = parse_spec(_read_yaml(path.with_suffix(".yaml")), repr(str(path.with_suffix(".yaml"))))
        data = read_file_bytes(path, MAX_MODEL_BYTES, "a model file", ModelFileError)
        try:
            stored = load_safetensors(data)
        except Exception as error:  # a corrupt untrusted file
            raise ModelFileError(f"{str(path)!r} is not a readable safetensors file: {error}") from None
        check_weight_values(stored, path)  # before the cast below would hide an integer or complex tensor
        return spec, {name: tensor.float() for name, tensor in stored.items()}
    if path.suffix == ".onnx":
        raise ModelFileError(f"{str(path)!r}: an ONNX graph runs in predict only (backend onnx); give its .ckpt here")
    checkpoint, spec = check_checkpoint(path)
    state = {f"networks.0.{name.removeprefix(MODULE_PREFIX)}": tensor
             for name, tensor in checkpoint["state_dict"].items() if name.startswith(MODULE_PREFIX)}  # fmt: skip
    check_weight_values(state, path)
    return spec, state


def build_predictor(spec: ModelSpec, bf16: bool = False) -> Predictor:
    """Untrained networks for every entry of ``spec`` (registry names only), in a Predictor."""
    networks = [
        SegmentationNetwork(
            build_network(network.name, network.options),
            presence_head=network.presence_head,
            input_size=network.input_size,
            channels_last=network.channels_last,
        )
        for network in spec.networks
    ]
    check = spec.xray_check
    xray_check = None if check is None else XrayCheck(check.feature_count, check.components)
    return Predictor(networks, spec.targets, spec.inference, bf16=bf16, xray_check=xray_check)


def ensemble_spec(specs: list[ModelSpec], paths: list[Path]) -> ModelSpec:
    """One spec for several models: their networks together, the first one's settings."""
    first = specs[0]
    for spec, path in zip(specs[1:], paths[1:], strict=True):
        if (spec.targets, spec.image_size, spec.has_presence) != (first.targets, first.image_size, first.has_presence):
            raise ModelFileError(
                f"{str(path)!r} cannot join an ensemble with {str(paths[0])!r}: targets, image size or presence head "
                f"differ ({spec.targets}, {spec.image_size}, {spec.has_presence} vs {first.targets}, "
                f"{first.image_size}, {first.has_presence})"
            )
    if len(specs) == 1:
        return first
    if any(spec.int8 is not None for spec in specs):
        log.info("int8 ranges are a model file's own: an ensemble of several files runs without them")
    networks = [network for spec in specs for network in spec.networks]
    return first.model_copy(update={"networks": networks, "metrics": {}, "int8": None})


WHOLE_NUMBER_TENSORS = ("num_batches_tracked",)  # BatchNorm's step counters, stored as int64


def check_weight_values(state: dict[str, torch.Tensor], path: Path) -> None:
    """Weights are real, finite numbers: a NaN or an infinity answers every image with garbage, and
    an integer or complex tensor would be cast into a network without a word."""
    for name, tensor in state.items():
        if name.endswith(WHOLE_NUMBER_TENSORS):
            continue
        if not tensor.is_floating_point():
            raise ModelFileError(f"{str(path)!r}: tensor {name!r} holds {tensor.dtype} values, expected real weights")
        if not bool(torch.isfinite(tensor).all()):
            raise ModelFileError(f"{str(path)!r}: tensor {name!r} holds NaN or infinite values: the model is damaged")


def load_predictor(
    ckpt_path: Any, log_dir: str | Path, bf16: bool = False, allow_missing_folds: bool = False, **inference: Any
) -> LoadedModel:
    """Load what ``ckpt_path`` names into one Predictor (networks under bf16 autocast with ``bf16``);
    ``inference`` overrides the files' settings (``None`` keeps them). Nothing is built before every
    file's spec has been validated."""
    paths = resolve_model_paths(ckpt_path, log_dir, allow_missing_folds=allow_missing_folds)
    read = [read_model_file(path) for path in paths]
    for path, (member_spec, state) in zip(paths, read, strict=True):
        check_xray_tensors(member_spec, state, path)  # before anything of the spec's size is built
        check_int8_tensor(member_spec, state, path)
    if any(member_spec.xray_check is not None for member_spec, _ in read[1:]):
        log.info("an ensemble's x-ray check is its first model's: the checks of the others are not used")
    spec = ensemble_spec([spec for spec, _ in read], paths).with_inference(**inference)
    predictor = build_predictor(spec, bf16)
    networks = iter(predictor.networks)
    for member, (path, (member_spec, state)) in enumerate(zip(paths, read, strict=True)):
        prefixes = tuple(f"networks.{index}." for index in range(len(member_spec.networks)))
        prefixes += (TENSOR_PREFIX,) if member_spec.xray_check is not None else ()
        ranges = {INT8_RANGES} if member_spec.int8 is not None else set()
        stray = next((name for name in state if not name.startswith(prefixes) and name not in ranges), None)
        if stray is not None:
            raise ModelFileError(f"{str(path)!r}: tensor {stray!r} belongs to no network of its model spec")
        if member == 0 and predictor.xray_check is not None:  # the ensemble's check is its first network's
            load_xray_check(predictor, state, path)
        for index in range(len(member_spec.networks)):
            prefix = f"networks.{index}."
            weights = {name.removeprefix(prefix): tensor for name, tensor in state.items() if name.startswith(prefix)}
            try:
                next(networks).load_state_dict(weights)
            except RuntimeError as error:
                first_lines = "; ".join(str(error).splitlines()[:2])[:300]
                raise ModelFileError(f"{str(path)!r}: the weights do not fit its model spec: {first_lines}") from None
    ranges = read[0][1].get(INT8_RANGES) if spec.int8 is not None else None
    return LoadedModel(predictor.eval(), spec, paths, ranges)


def int8_operating_point(loaded: LoadedModel, inference: Mapping[str, Any]) -> tuple[LoadedModel, str | None]:
    """``loaded`` as its int8 ranges were measured (gated at ``int8.presence_threshold`` unless the
    command sets ``presence_threshold`` itself, in ``inference``), and why its ranges cannot serve
    it (``None``: they can) when a setting the graph holds differs from what they were measured
    with. A new Predictor around the same networks; ``loaded`` is left as it was."""
    int8 = loaded.spec.int8
    assert int8 is not None, "only a model file with int8 ranges has an int8 operating point"
    spec = loaded.spec
    gate = int8.presence_threshold
    if inference.get("presence_threshold") is None and gate is not None and gate != spec.inference.presence_threshold:
        spec = spec.with_inference(presence_threshold=gate)
    changed = [
        f"{key}={getattr(spec.inference, key)} (its int8 ranges were measured with {getattr(int8, key)})"
        for key in GRAPH_SETTINGS
        if getattr(spec.inference, key) != getattr(int8, key)
    ]
    if spec is loaded.spec:
        return loaded, "; ".join(changed) or None
    old = loaded.predictor
    predictor = Predictor(list(old.networks), spec.targets, spec.inference, bf16=old.bf16, xray_check=old.xray_check)
    return dataclasses.replace(loaded, predictor=predictor.eval(), spec=spec), "; ".join(changed) or None


MAX_INT8_RANGE = 1e4  # activations of networks fed images in [0, 1] lie far inside this


def check_int8_tensor(spec: ModelSpec, state: dict[str, torch.Tensor], path: Path) -> None:
    """The int8 ranges a spec declares are in the file, one row of four per quantizer, each a range
    (low below high, within ``MAX_INT8_RANGE``): anything else would answer with NaNs."""
    if spec.int8 is None:
        return
    tensor = state.get(INT8_RANGES)
    shape = (spec.int8.quantizers, 4)
    if tensor is None or tuple(tensor.shape) != shape:
        found = "missing" if tensor is None else f"of shape {tuple(tensor.shape)}"
        raise ModelFileError(f"{str(path)!r}: tensor {INT8_RANGES!r} is {found}; its spec's int8 entry needs {shape}")
    finite = torch.isfinite(tensor).all(dim=1) & (tensor.abs() <= MAX_INT8_RANGE).all(dim=1)
    ordered = (tensor[:, 0] < tensor[:, 1]) & (tensor[:, 2] < tensor[:, 3])
    bad = (~(finite & ordered)).nonzero().flatten().tolist()
    if bad:
        raise ModelFileError(
            f"{str(path)!r}: tensor {INT8_RANGES!r} row {bad[0]} is {tensor[bad[0]].tolist()}: expected "
            f"[input low, input high, output low, output high], each low below its high, within ±{MAX_INT8_RANGE:g}"
        )


def check_xray_tensors(spec: ModelSpec, state: dict[str, torch.Tensor], path: Path) -> None:
    """A model spec's x-ray check has its tensors in the file, of the sizes it declares, and they
    are a reference (spreads of at least 1e-6, orthonormal directions): checked before the check is
    built, so a spec cannot make the loader allocate what the file does not hold."""
    check = spec.xray_check
    if check is None:
        return
    expected = {"mean": (check.feature_count,), "scale": (check.feature_count,),
                "basis": (check.components, check.feature_count)}  # fmt: skip
    for name, shape in expected.items():
        tensor = state.get(TENSOR_PREFIX + name)
        found = "missing" if tensor is None else f"of shape {tuple(tensor.shape)}"
        if tensor is None or tuple(tensor.shape) != shape:
            raise ModelFileError(
                f"{str(path)!r}: tensor '{TENSOR_PREFIX}{name}' is {found}; the x-ray check its spec declares needs "
                f"shape {shape}"
            )
    if not bool((state[TENSOR_PREFIX + "scale"] >= 1e-6).all()):
        raise ModelFileError(f"{str(path)!r}: tensor '{TENSOR_PREFIX}scale' holds values below 1e-6, expected spreads")
    basis = state[TENSOR_PREFIX + "basis"].double()
    if not torch.allclose(basis @ basis.T, torch.eye(check.components, dtype=torch.float64), atol=1e-2):
        raise ModelFileError(f"{str(path)!r}: tensor '{TENSOR_PREFIX}basis' is not a set of orthonormal directions")


def load_xray_check(predictor: Predictor, state: dict[str, torch.Tensor], path: Path) -> None:
    """The x-ray check's reference from ``state`` (checked by :func:`check_xray_tensors`), checked
    against the first network's encoder."""
    assert predictor.xray_check is not None
    tensors = {
        name.removeprefix(TENSOR_PREFIX): tensor for name, tensor in state.items() if name.startswith(TENSOR_PREFIX)
    }
    predictor.xray_check.load_state_dict(tensors)
    width = predictor.networks[0].summary_width()
    if width != predictor.xray_check.mean.numel():
        raise ModelFileError(
            f"{str(path)!r}: xray_check.feature_count is {predictor.xray_check.mean.numel()}, "
            f"but the first network's encoder gives {width} features"
        )


def read_onnx_metadata(path: Path) -> tuple[ExportMetadata, ModelSpec]:
    """The validated ``.json`` beside an exported ONNX graph."""
    meta_path = path.with_suffix(".json")
    if not meta_path.is_file():
        raise ModelFileError(f"{str(path)!r} has no metadata file {str(meta_path)!r}: export it with covidseg.export")
    text = _small_file(meta_path)
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError
        raise ModelFileError(f"{str(meta_path)!r} is not valid JSON: {error}") from None
    return parse_export_metadata(data, repr(str(meta_path)))
