"""Decoded X-rays in, per-image answers out: what ``predict`` writes to files and ``serve`` returns.

A :data:`Backend` is the model as a function of a batch (the torch Predictor, or its ONNX graph in
ONNX Runtime or compiled by OpenVINO); :func:`segment` resizes a batch of grayscale images to the model's
side, runs the backend and maps each answer back to its image's own size as an
:class:`ImageResult` (masks, lungs, overlay, statistics and severity).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from covidseg.core.errors import ConfigError, ModelFileError
from covidseg.core.files import open_regular_file, printable
from covidseg.core.hardware import cpu_has_int8_dot_products
from covidseg.core.images import resize_image
from covidseg.core.visualize import LUNG_COLOR, PREDICTION_COLOR, outline, overlay
from covidseg.inference.exporters import cached_onnx
from covidseg.inference.loader import (
    MAX_MODEL_BYTES,
    LoadedModel,
    allow_missing_folds,
    inference_bf16,
    inference_overrides,
    int8_operating_point,
    load_predictor,
    read_onnx_metadata,
    resolve_model_paths,
    xray_check_setting,
)
from covidseg.inference.model_spec import APPLIED_AFTER_GRAPH, InferenceSettings, ModelSpec
from covidseg.inference.predictor import Answer, Forward, Predictor
from covidseg.inference.quantize import cached_int8, cached_shipped_int8, calibration_setting
from covidseg.inference.regions import drop_small_regions
from covidseg.inference.severity import severity, zones

# (N, 1, S, S) float32 in [0, 1] -> the model's answer as numpy arrays (probabilities, presence, x-ray scores)
Backend = Callable[[np.ndarray], Answer]
BACKENDS = ("auto", "torch", "onnx", "openvino", "openvino_int8")
log = logging.getLogger(__name__)


def torch_backend(predictor: Predictor) -> Backend:
    def run(images: np.ndarray) -> Answer:
        prediction = predictor.predict(torch.from_numpy(images))
        as_array = [None if value is None else value.numpy() for value in (prediction.presence, prediction.xray_score)]
        return Answer(prediction.probability.numpy(), *as_array)

    return run


def named_answer(values: Mapping[str, np.ndarray]) -> Answer:
    """A graph's outputs by name (``ModelSpec.graph_outputs``) as an Answer."""
    return Answer(values["probability"], values.get("presence"), values.get("xray_score"))


def check_graph_outputs(path: Path, names: Sequence[str], expected: Sequence[str]) -> None:
    """A graph answers with the outputs its model spec says, in that order (a graph with other
    outputs would be read wrong, or refuse nothing its spec promises to refuse)."""
    if list(names) != list(expected):
        raise ModelFileError(
            f"{printable(path)!r}: the graph's outputs are {list(names)}, but its model spec expects {list(expected)}"
        )


def runtime_threads() -> int | None:
    """The threads ONNX Runtime and OpenVINO may use: ``OMP_NUM_THREADS`` when set (Lightning sets it
    in each process it starts to that process's share of the cores, and torch follows it), else
    the runtime's own choice."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def onnx_backend(path: Path, expected: Sequence[str]) -> Backend:
    """An ONNX graph in ONNX Runtime (fp32), whose outputs must be ``expected``."""
    import onnxruntime

    with open_regular_file(path, MAX_MODEL_BYTES, "an ONNX graph", ModelFileError):
        pass  # a pipe, a device or an oversized file is refused before ONNX Runtime reads it
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = runtime_threads() or 0  # 0: ONNX Runtime's choice
    try:  # by path: ONNX Runtime refuses external data outside the graph's folder
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own types for corrupt or unsupported graphs
        first_line = (str(error).splitlines() or [type(error).__name__])[0][:200]
        raise ModelFileError(f"{printable(path)!r} is not an ONNX graph ONNX Runtime can run: {first_line}") from None
    name = session.get_inputs()[0].name
    names = [output.name for output in session.get_outputs()]
    check_graph_outputs(path, names, expected)

    def run(images: np.ndarray) -> Answer:
        return named_answer(dict(zip(names, session.run(None, {name: images}), strict=True)))

    return run


def refuse_external_data(path: Path) -> None:
    """An ONNX graph whose weights live in other files ("external data", which could name any file)
    is refused; covidseg's exports keep every weight inside the graph."""
    import onnx

    with open_regular_file(path, MAX_MODEL_BYTES, "an ONNX graph", ModelFileError) as file:
        try:
            model = onnx.load_model_from_string(file.read())  # never reads external data
        except Exception as error:  # protobuf's DecodeError and friends
            raise ModelFileError(f"{printable(path)!r} is not an ONNX graph: {type(error).__name__}") from None
    if any(tensor.data_location == onnx.TensorProto.EXTERNAL for tensor in model.graph.initializer):
        raise ModelFileError(f"{printable(path)!r} keeps weights in other files (ONNX external data): not read")


def openvino_backend(path: Path, bf16: bool, expected: Sequence[str]) -> Backend:
    """An ONNX graph (or an int8 model covidseg made, ``.xml``) compiled by OpenVINO for this CPU, in
    bf16 where ``bf16`` (the CPU has it) and fp32 otherwise (for what int8 leaves in float), whose
    outputs must be ``expected``; one inference request per call, so threads may share it."""
    import openvino

    if path.suffix == ".onnx":  # OpenVINO, unlike ONNX Runtime, is not documented to keep them in the folder
        refuse_external_data(path)
    settings: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32"}
    threads = runtime_threads()
    if threads is not None:
        settings["INFERENCE_NUM_THREADS"] = threads
    try:
        compiled = openvino.Core().compile_model(str(path), "CPU", settings)
    except Exception as error:  # OpenVINO raises RuntimeError with its own messages for bad graphs
        lines = [line for line in str(error).splitlines() if line.strip() and not line.startswith("Exception from")]
        reason = " ".join(lines)[:200] or type(error).__name__
        raise ModelFileError(f"{printable(path)!r} is not an ONNX graph OpenVINO can compile: {reason}") from None
    # an output may carry several names (OpenVINO keeps the graph's internal one beside ours)
    found = [next((name for name in expected if name in output.get_names()), output.get_any_name())
             for output in compiled.outputs]  # fmt: skip
    check_graph_outputs(path, found, expected)
    outputs = dict(zip(found, compiled.outputs, strict=True))

    def run(images: np.ndarray) -> Answer:
        answer = compiled.create_infer_request().infer({0: images})
        return named_answer({name: answer[output] for name, output in outputs.items()})

    return run


def int8_graph(graph: Path, int8_calibration: str | None, cache_dir: Path, loaded: LoadedModel | None = None) -> Path:
    """The int8 OpenVINO model of the ONNX ``graph``, made once (:mod:`covidseg.inference.quantize`):
    calibrated on ``int8_calibration``'s X-rays where it is given, else rebuilt from the int8 ranges
    ``loaded``'s model file carries; a graph with external data is refused first."""
    refuse_external_data(graph)
    if int8_calibration is None and loaded is not None and loaded.int8_ranges is not None:
        assert loaded.spec.int8 is not None
        ranges, digests = loaded.int8_ranges.numpy(), loaded.spec.int8.accepted_digests
        try:
            return cached_shipped_int8(graph, ranges, digests, loaded.spec.image_size, cache_dir)
        except ModelFileError as error:
            raise ModelFileError(f"{printable(loaded.paths[0])!r}: {error}") from None
    _, spec = read_onnx_metadata(graph)
    return cached_int8(graph, int8_calibration, spec.image_size, cache_dir)


def graph_backend(backend: str, path: Path, bf16: bool, expected: Sequence[str]) -> Backend:
    """An ONNX graph run by ONNX Runtime (fp32), or by OpenVINO (also an int8 model made by
    :func:`int8_graph`), with the outputs ``expected``."""
    return onnx_backend(path, expected) if backend == "onnx" else openvino_backend(path, bf16, expected)


def as_forward(backend: Backend) -> Forward:
    """A numpy backend as the Predictor's forward on tensors (for Lightning's test loop)."""

    def forward(images: torch.Tensor) -> Answer:
        answer = backend(images.detach().float().cpu().contiguous().numpy())
        # where the loop keeps the masks
        return Answer(*(None if value is None else torch.from_numpy(value).to(images.device) for value in answer))

    return forward


def backends_to_try(backend: str, has_int8_ranges: bool) -> list[str]:
    """``backend`` checked, as the backends to try in turn: itself, or for ``auto`` the fastest that
    held accuracy on the CPUs measured (docs/performance.md) first: OpenVINO int8 where the model
    file carries int8 ranges and the CPU multiplies int8 natively, OpenVINO (bf16 where the CPU has
    it), and torch where OpenVINO is missing or fails."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend={backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return [backend]
    if importlib.util.find_spec("openvino") is None:
        return ["torch"]
    return ["openvino_int8"] * (has_int8_ranges and cpu_has_int8_dot_products()) + ["openvino", "torch"]


def say_auto_choice(chosen: str, bf16: bool) -> None:
    """``backend=auto``'s choice and its reason, said once."""
    if chosen == "openvino_int8":
        log.info("backend=auto: openvino int8 (the model file carries int8 ranges; this CPU multiplies int8 natively)")
    elif chosen in ("openvino", "onnx"):
        log.info("backend=auto: %s in %s", chosen, "bf16" if bf16 and chosen == "openvino" else "fp32")
    elif importlib.util.find_spec("openvino") is None:
        log.info("backend=auto: torch (OpenVINO is not installed)")
    else:
        log.info("backend=auto: torch")


@dataclass
class LoadedBackend:
    """A backend, the spec it answers by (image size, targets, thresholds) and the files it came
    from; ``refuse_above`` is the x-ray score beyond which a picture is refused (``None``: none is)."""

    run: Backend
    spec: ModelSpec
    paths: list[Path]
    refuse_above: float | None = None
    int8_graph: Path | None = None  # the int8 model that runs, with backend=openvino_int8

    def checking(self, xray_check: bool) -> LoadedBackend:
        """This backend refusing pictures unlike X-rays where ``xray_check`` (a command's setting)
        is true and the model has the check."""
        check = self.spec.xray_check
        if xray_check and check is None:
            log.info("xray_check: this model has no x-ray check, so every picture is answered")
        self.refuse_above = check.threshold if xray_check and check is not None else None
        return self


def int8_calibration_for(backend: str, int8_calibration: str | None) -> str | None:
    """``int8_calibration`` as ``backend`` reads it: checked (one line) for ``openvino_int8``; for any
    other backend said in one warning and dropped (``auto`` runs int8 from a model file's ranges only)."""
    if int8_calibration is None:
        return None
    if backend == "openvino_int8":
        return calibration_setting(int8_calibration)
    log.warning("int8_calibration is read by backend=openvino_int8 only; backend=%s runs without it", backend)
    return None


def load_backend(
    ckpt_path: Any,
    log_dir: str | Path,
    backend: str,
    inference: Mapping[str, Any],
    bf16: bool,
    cache_dir: Path,
    allow_missing_folds: bool = False,
    int8_calibration: str | None = None,
) -> LoadedBackend:
    """What ``ckpt_path`` names, as a backend: an exported ``.onnx`` runs as
    :func:`graph_file_backend` says; anything else builds the torch Predictor, exported first (once:
    the graph is kept under ``<cache_dir>/graphs``) when ``backend`` is ``onnx`` or ``openvino``
    (``openvino_int8``: quantized on ``int8_calibration``'s X-rays, or with the model file's int8
    ranges). ``auto`` tries :func:`backends_to_try` in turn and says what it chose."""
    int8_calibration = int8_calibration_for(backend, int8_calibration)  # refused before a model is read
    paths = resolve_model_paths(ckpt_path, log_dir, allow_missing_folds=allow_missing_folds)
    if any(path.suffix == ".onnx" for path in paths):
        return graph_file_backend(paths, backend, inference, bf16, cache_dir, int8_calibration)
    loaded = load_predictor([str(path) for path in paths], log_dir, bf16 and backend == "torch", **inference)
    chosen = first_working_backend(loaded, backend, inference, bf16, cache_dir, int8_calibration)
    return LoadedBackend(chosen.run, chosen.model.spec, paths, int8_graph=chosen.int8_graph)


@dataclass
class ChosenBackend:
    """The backend that runs a loaded model: its name, the model as it runs (the int8 model carries
    its own presence gate) and, for ``openvino_int8``, the int8 model file."""

    name: str
    run: Backend
    model: LoadedModel
    int8_graph: Path | None = None

    @property
    def forward(self) -> Forward | None:
        """The backend as the Predictor's forward on tensors; ``None`` for torch (the Predictor itself)."""
        return None if self.name == "torch" else as_forward(self.run)


def first_working_backend(
    loaded: LoadedModel,
    backend: str,
    inference: Mapping[str, Any],
    bf16: bool,
    cache_dir: Path,
    int8_calibration: str | None = None,
) -> ChosenBackend:
    """``backend`` for ``loaded``: for ``auto`` the first of :func:`backends_to_try` that builds
    (each failure said in one line, the choice said once), else that backend or its one-line
    refusal. What predict, serve and eval share, so that all three run the same backend."""
    if backend == "openvino_int8" and int8_calibration is None and loaded.int8_ranges is None:
        calibration_setting(None)  # refused before a graph is traced
    order = backends_to_try(backend, loaded.int8_ranges is not None)
    for index, name in enumerate(order):
        if name == "torch":
            break
        model = loaded
        try:
            if name == "openvino_int8" and int8_calibration is None:
                model = shipped_int8_model(loaded, inference)
            graph = cached_onnx(model, cache_dir)  # an ONNX export is traced in fp32
            if name == "openvino_int8":
                graph = int8_graph(graph, int8_calibration, cache_dir, model)
            run = graph_backend(name, graph, bf16, model.spec.graph_outputs)
        except Exception as error:  # a network the ONNX exporter or OpenVINO cannot take, ranges that do not fit
            if backend != "auto":
                raise
            reason = (str(error).splitlines() or ["?"])[0][:300]
            log.warning("backend=auto: %s failed, trying %s: %s", name, order[index + 1], reason)
            continue
        if backend == "auto":
            say_auto_choice(name, bf16)
        return ChosenBackend(name, run, model, graph if name == "openvino_int8" else None)
    if backend == "auto":
        say_auto_choice("torch", bf16)
    loaded.predictor.bf16 = bf16
    return ChosenBackend("torch", torch_backend(loaded.predictor), loaded)


def shipped_int8_model(loaded: LoadedModel, inference: Mapping[str, Any]) -> LoadedModel:
    """``loaded`` at the operating point its file's int8 ranges were measured at, or a one-line
    refusal naming the setting of this command that the ranges do not fit."""
    model, changed = int8_operating_point(loaded, inference)
    if changed:
        raise ConfigError(f"{printable(loaded.paths[0])!r}: its int8 ranges do not fit this command: {changed}")
    return model


def graph_file_backend(
    paths: list[Path],
    backend: str,
    inference: Mapping[str, Any],
    bf16: bool,
    cache_dir: Path,
    int8_calibration: str | None,
) -> LoadedBackend:
    """An exported ``.onnx`` graph as a backend: in OpenVINO with ``backend=openvino`` (``auto``,
    falling back to ONNX Runtime) or ``openvino_int8`` (calibrated on ``int8_calibration``), else in
    ONNX Runtime."""
    chosen = backends_to_try(backend, has_int8_ranges=False)[0]
    if chosen == "openvino_int8":
        calibration_setting(int8_calibration)
    if len(paths) > 1:
        raise ModelFileError("an exported .onnx graph runs alone: export the ensemble as one graph instead")
    baked = sorted(key for key, value in inference.items() if key not in APPLIED_AFTER_GRAPH and value is not None)
    if baked:
        raise ModelFileError(f"{', '.join(baked)} cannot change an exported .onnx graph: export again with them")
    metadata, spec = read_onnx_metadata(paths[0])
    if metadata.outputs != spec.graph_outputs:
        raise ModelFileError(
            f"{printable(paths[0].with_suffix('.json'))!r}: key 'outputs' = {metadata.outputs}, but its model "
            f"spec makes the graph answer {spec.graph_outputs}"
        )
    settings = {key: inference.get(key) for key in APPLIED_AFTER_GRAPH}
    graph = int8_graph(paths[0], int8_calibration, cache_dir) if chosen == "openvino_int8" else paths[0]
    if chosen == "torch":  # auto without OpenVINO: the graph's own runtime
        chosen = "onnx"
    try:
        run = graph_backend(chosen, graph, bf16, spec.graph_outputs)
    except ModelFileError as error:
        if backend != "auto":
            raise
        log.warning("backend=auto: ONNX Runtime, as OpenVINO failed: %s", error)
        chosen, run = "onnx", onnx_backend(paths[0], spec.graph_outputs)
    if backend == "auto":
        say_auto_choice(chosen, bf16)
    quantized = graph if chosen == "openvino_int8" else None
    return LoadedBackend(run, spec.with_inference(**settings), paths, int8_graph=quantized)


def load_configured_backend(cfg: Mapping[str, Any]) -> LoadedBackend:
    """:func:`load_backend` with a command's own settings (``ckpt_path``, ``backend``, the
    inference keys, ``bf16``, ``allow_missing_folds``, ``xray_check``, ``paths``): what predict
    and serve share. The settings are checked before the model is read."""
    refuse = xray_check_setting(cfg)
    return load_backend(
        cfg["ckpt_path"],
        cfg["paths"]["log_dir"],
        cfg["backend"],
        inference_overrides(cfg),
        inference_bf16(cfg),
        Path(cfg["paths"]["cache_dir"]),
        allow_missing_folds(cfg),
        cfg.get("int8_calibration"),
    ).checking(refuse)


class ImageResult:
    """One image's answer at its own size: infection probability and mask, lungs when the model has
    them, the presence probability, and what is drawn and counted from them."""

    def __init__(
        self,
        image: np.ndarray,
        probability: np.ndarray,
        lung: np.ndarray | None,
        presence: float | None,
        settings: InferenceSettings,
        xray_score: float | None = None,
        refuse_above: float | None = None,
    ) -> None:
        height, width = image.shape
        self.image, self.presence, self.xray_score, self.refuse_above = image, presence, xray_score, refuse_above
        # refused: the picture does not look like the chest X-rays the model learnt from
        self.refused = xray_score is not None and refuse_above is not None and not xray_score <= refuse_above
        self.probability = cv2.resize(probability, (width, height), interpolation=cv2.INTER_LINEAR)
        self.mask = drop_small_regions(self.probability > settings.threshold, settings.min_region_share)
        self.lung = None
        if lung is not None:
            self.lung = cv2.resize(lung, (width, height), interpolation=cv2.INTER_LINEAR) > settings.threshold

    def overlay(self) -> np.ndarray:
        """The X-ray (RGB) with the infection tinted and outlined, and the lungs outlined."""
        drawn = overlay(self.image, self.mask, PREDICTION_COLOR)
        return drawn if self.lung is None else outline(drawn, self.lung, LUNG_COLOR)

    def stats(self) -> dict[str, Any]:
        """Size, infected area, mean probability inside the mask and (with a presence head) presence."""
        height, width = self.image.shape
        infected = int(self.mask.sum())
        stats: dict[str, Any] = {
            "width": width,
            "height": height,
            "infected_pixels": infected,
            "infected_percent": round(100 * infected / self.mask.size, 4),
            "mean_probability": round(float(self.probability[self.mask].mean()) if infected else 0.0, 4),
        }
        if self.presence is not None:
            stats["presence_probability"] = round(self.presence, 4)
        if self.xray_score is not None:
            stats["xray_score"] = round(self.xray_score, 3)
        return stats

    def refusal(self) -> str:
        """Why a refused picture is not answered, in one line."""
        return (
            f"does not look like a chest X-ray (x-ray score {self.xray_score:.1f}, above {self.refuse_above:.1f} where "
            "the model's reference X-rays lie); xray_check=false answers it anyway"
        )

    def zones(self) -> dict[str, tuple[np.ndarray, bool]] | None:
        """The six lung zones and whether each is involved (:func:`covidseg.inference.severity.zones`);
        ``None`` without lungs."""
        return None if self.lung is None else zones(self.lung, self.mask)

    def severity(self) -> dict[str, float] | None:
        """Per-lung infected percentages and the zone score (:mod:`covidseg.inference.severity`);
        ``None`` without lungs."""
        if self.lung is None:
            return None
        return {key: round(value, 4) for key, value in severity(self.lung, self.mask).items()}


def segment(
    backend: Backend, spec: ModelSpec, images: Sequence[np.ndarray], refuse_above: float | None = None
) -> list[ImageResult]:
    """Run one batch of 8-bit grayscale images (any sizes) through the model; images whose x-ray
    score is above ``refuse_above`` come back ``refused``."""
    targets = spec.targets
    channel = targets.index("infection") if "infection" in targets else 0
    lung_channel = targets.index("lung") if "lung" in targets and len(targets) > 1 else None
    stacked = np.stack([resize_image(image, spec.image_size) for image in images])[:, None].astype(np.float32) / 255
    probabilities, presences, xray_scores = backend(stacked)
    return [
        ImageResult(
            image,
            probability[channel],
            probability[lung_channel] if lung_channel is not None else None,
            None if presences is None else float(presences[index]),
            spec.inference,
            None if xray_scores is None else float(xray_scores[index]),
            refuse_above,
        )
        for index, (image, probability) in enumerate(zip(images, probabilities, strict=True))
    ]
