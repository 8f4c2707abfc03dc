"""int8 graphs for OpenVINO: a model's ONNX graph quantized after training with NNCF (static
post-training quantization), calibrated on X-rays the user names, made once and kept.

NNCF's OpenVINO path, not its ONNX one, and three parts kept in float, because that is what held
accuracy on the shipped pair (Val COVID-19, docs/performance.md): the ONNX path (a QDQ graph) lost
0.007 Dice in ONNX Runtime and 0.07 in OpenVINO; the OpenVINO path with every operation quantized
lost 0.011; NNCF's accuracy-controlled search (``quantize_with_accuracy_control``, 2.5 min) restored
it by reverting exactly the ``presence`` output (a small shift flips the gate) and each network's
first convolution (it reads the raw image). Here the first convolutions and everything after the
last convolution (sigmoids, means, presence heads and gate, the x-ray check, whose score meets a
threshold) stay in float, found by their place in the graph, so no search runs per model.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import io
import json
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from covidseg.core.errors import ConfigError, DataError, ModelFileError
from covidseg.core.files import printable, read_file_bytes
from covidseg.core.images import MAX_FILE_BYTES, find_inputs, read_unchanged, resize_image, xray_gray
from covidseg.core.writing import write_atomic
from covidseg.inference.loader import MAX_MODEL_BYTES

MAX_CALIBRATION_IMAGES = 300  # NNCF's default subset
FEW_CALIBRATION_IMAGES = 100  # below this a warning says so
log = logging.getLogger(__name__)
SCHEME = "nncf-openvino-mixed-v3"  # changes when the recipe below does, so older cached graphs are not reused


def calibration_setting(value: object) -> str:
    """``int8_calibration``, which ``backend=openvino_int8`` needs."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(
            f"int8_calibration={value!r}: int8 needs X-rays to calibrate on: a folder or glob of a "
            "few hundred X-rays like those it will see, e.g. '<data>/Train/*/images/*.png' (or a model file with "
            "int8 ranges: covidseg.export format=safetensors int8_calibration=...)"
        )
    return value


def calibration_files(pattern: str | None) -> list[Path]:
    """Up to :data:`MAX_CALIBRATION_IMAGES` image files of ``int8_calibration`` (a file, a folder
    searched recursively or a glob), evenly spaced over the sorted list so every class of a split
    folder is drawn from."""
    setting = calibration_setting(pattern)
    files = sorted(find_inputs(setting, named_by=f"int8_calibration={setting!r}:", error=ConfigError)[0])
    if len(files) < FEW_CALIBRATION_IMAGES:
        log.warning("int8_calibration=%r: %d image(s); a few hundred calibrate int8 better", setting, len(files))
    chosen = np.unique(np.linspace(0, len(files) - 1, min(len(files), MAX_CALIBRATION_IMAGES)).round().astype(int))
    return [files[index] for index in chosen]


def calibration_batch(files: Sequence[Path], image_size: int) -> np.ndarray:
    """The graph's input for ``files``: grayscale / 255 at the model's side, as predict feeds it."""
    images = [resize_image(xray_gray(read_unchanged(path), printable(path)), image_size) for path in files]
    return np.stack(images)[:, None].astype(np.float32) / 255


def first_convolutions(model: object) -> list[str]:
    """The convolutions that read the image itself (each network's first): no other convolution
    lies between them and the graph's input."""
    before_any_convolution = {parameter.get_name() for parameter in model.get_parameters()}  # unique names
    found = []
    for op in model.get_ordered_ops():
        if not any(value.get_node().get_name() in before_any_convolution for value in op.input_values()):
            continue
        if op.get_type_name() == "Convolution":
            found.append(op.get_friendly_name())
        else:
            before_any_convolution.add(op.get_name())
    return found


def after_last_convolution(model: object) -> list[str]:
    """The operations no convolution follows: sigmoids, the ensemble's and flip's means, the
    presence heads and gate, the x-ray check. They cost little, and a small shift in them moves
    answers that are compared with thresholds."""
    feeds_convolution: set[str] = set()
    tail = []
    for op in reversed(model.get_ordered_ops()):
        consumers = [target.get_node() for output in op.outputs() for target in output.get_target_inputs()]
        if any(node.get_type_name() == "Convolution" or node.get_name() in feeds_convolution for node in consumers):
            feeds_convolution.add(op.get_name())
        elif op.get_type_name() not in ("Convolution", "Parameter", "Result", "Constant"):
            tail.append(op.get_friendly_name())
    return tail


def quantize_int8(graph: Path, images: np.ndarray) -> object:
    """The OpenVINO model of ``graph`` with int8 weights and activations, calibrated on ``images``."""
    import nncf
    import openvino
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters

    nncf.set_log_level(logging.ERROR)  # its per-operation notes would bury the command's own output
    model = openvino.Core().read_model(str(graph))
    keep_float = nncf.IgnoredScope(names=first_convolutions(model) + after_last_convolution(model), validate=False)
    dataset = nncf.Dataset([images[index : index + 1] for index in range(len(images))])
    # bias correction would change biases by the calibration images, which a model file's ranges do
    # not carry; on the shipped pair it changed none (the same int8 model to the byte without it)
    no_bias_correction = AdvancedQuantizationParameters(disable_bias_correction=True)
    return nncf.quantize(
        model,
        dataset,
        subset_size=len(images),
        preset=nncf.QuantizationPreset.MIXED,
        ignored_scope=keep_float,
        advanced_parameters=no_bias_correction,
    )


def int8_versions() -> dict[str, str]:
    """The versions that decide an int8 model's bytes: the quantizer, the runtime, the exporter."""
    return {name: importlib.metadata.version(name) for name in ("nncf", "openvino", "torch")}


RANGE_PORTS = ("input_low", "input_high", "output_low", "output_high")  # FakeQuantize's inputs 1-4


def _quantizers(model: object) -> list[object]:
    return [op for op in model.get_ordered_ops() if op.get_type_name() == "FakeQuantize"]


def quantizer_ranges(model: object) -> np.ndarray:
    """The ranges (quantizers x 4: input low, input high, output low, output high) of the int8
    ``model``'s quantizers, in graph order: all a calibration decides."""
    rows = []
    for op in _quantizers(model):
        values = [op.input_value(port).get_node().get_data() for port in range(1, 5)]
        if any(value.size != 1 for value in values):
            name = op.get_friendly_name()
            raise ModelFileError(f"quantizer {name!r} has per-channel ranges: a model file keeps per-tensor ones")
        rows.append([float(value.reshape(-1)[0]) for value in values])
    return np.asarray(rows, np.float32).reshape(-1, len(RANGE_PORTS))


def with_ranges(model: object, ranges: np.ndarray) -> object:
    """``model`` (quantized as the ranges' model was) with ``ranges`` put into its quantizers."""
    from openvino import opset13

    found = _quantizers(model)
    if len(found) != len(ranges):
        raise ModelFileError(f"key 'int8.quantizers' is {len(ranges)}, but the graph has {len(found)} quantizers here")
    for op, row in zip(found, ranges, strict=True):
        for port, value in enumerate(row, start=1):
            old = op.input_value(port).get_node()
            new = opset13.constant(np.asarray(value, np.float32).reshape(old.get_data().shape))
            new.set_friendly_name(old.get_friendly_name())
            op.input(port).replace_source_output(new.output(0))
    return model


def int8_digest(model: object) -> str:
    """SHA-256 of an OpenVINO model as it computes: each operation's type, attributes, inputs (which
    operation's which output) and output types and shapes, and every constant's values, in graph
    order; names are left out (OpenVINO numbers unnamed operations per process). Equal digests, the
    same int8 model."""
    digest = hashlib.sha256()
    ops = model.get_ordered_ops()
    index = {op.get_name(): position for position, op in enumerate(ops)}
    for op in ops:
        sources = [(index[value.get_node().get_name()], value.get_index()) for value in op.input_values()]
        outputs = [(str(output.get_element_type()), str(output.get_partial_shape())) for output in op.outputs()]
        attributes = sorted((key, repr(value)) for key, value in op.get_attributes().items())
        digest.update(repr((op.get_type_name(), attributes, sources, outputs)).encode())
        if op.get_type_name() == "Constant":
            data = np.ascontiguousarray(op.get_data())
            digest.update(f"{data.dtype}{data.shape}".encode())
            digest.update(data.tobytes())
    return digest.hexdigest()


def placement_image(image_size: int) -> np.ndarray:
    """The one image the graph is quantized on to place its quantizers before stored ranges go in."""
    return np.linspace(0.2, 0.8, image_size * image_size, dtype=np.float32).reshape(1, 1, image_size, image_size)


def cpu_identity() -> str:
    """The CPU as OpenVINO sees it (name and capabilities): the same ranges can make another int8
    model on another kind of CPU."""
    import openvino

    core = openvino.Core()
    return f"{core.get_property('CPU', 'FULL_DEVICE_NAME')} {core.get_property('CPU', 'OPTIMIZATION_CAPABILITIES')}"


def rebuild_int8(graph: Path, ranges: np.ndarray, digests: tuple[str, ...], image_size: int) -> object:
    """The int8 model that ``ranges`` were taken from, made again from ``graph``; refused unless it
    is that model (one of ``digests``: the measured one, then those the ranges make on other CPUs)."""
    with contextlib.redirect_stdout(io.StringIO()):  # NNCF's progress bar over one image says nothing
        model = with_ranges(quantize_int8(graph, placement_image(image_size)), ranges)
    rebuilt = int8_digest(model)
    if rebuilt not in digests:
        versions = ", ".join(f"{name} {version}" for name, version in int8_versions().items())
        others = " nor any of its 'int8.rebuilt_digests'" if len(digests) > 1 else ""
        raise ModelFileError(
            f"key 'int8.digest' is {digests[0][:12]}...{others}, but its ranges make {rebuilt} on this CPU "
            f"({versions}): another exporter, quantizer or CPU placed them otherwise; calibrate here with "
            "int8_calibration=<X-rays> (add this digest to int8.rebuilt_digests only if that gives the same ranges)"
        )
    return model


def shippable_ranges(graph: Path, calibration: str, image_size: int) -> tuple[np.ndarray, str, int]:
    """``graph`` calibrated on ``calibration``'s X-rays, as the numbers a model file keeps: its
    quantizers' ranges, the int8 model's digest, and how many X-rays were used. Checked here that
    the ranges rebuild that model."""
    files = calibration_files(calibration)
    quantized = quantize_int8(graph, calibration_batch(files, image_size))
    ranges, digest = quantizer_ranges(quantized), int8_digest(quantized)
    rebuild_int8(graph, ranges, (digest,), image_size)
    return ranges, digest, len(files)


def _digest(graph: Path, files: Sequence[Path]) -> str:
    """The cache entry's name: the graph's and its metadata's bytes (an exported ``model.onnx`` is
    named by the user, so its name says nothing), the calibration images' bytes, NNCF's and
    OpenVINO's versions and this module's scheme."""
    digest = hashlib.sha256()
    for path, expected in [(graph, "an ONNX graph"), (graph.with_suffix(".json"), "a graph's metadata")]:
        digest.update(hashlib.sha256(read_file_bytes(path, MAX_MODEL_BYTES, expected, ModelFileError)).digest())
    for path in files:  # read as untrusted: a FIFO or a link to /dev/zero named like an image is refused
        digest.update(hashlib.sha256(read_file_bytes(path, MAX_FILE_BYTES, "an image file", DataError)).digest())
    digest.update(json.dumps(int8_versions() | {"scheme": SCHEME}, sort_keys=True).encode())
    return digest.hexdigest()[:32]


def _kept(path: Path) -> bool:
    """Whether the cache entry ``path`` (``.xml``, ``.bin`` and the ``.json`` record of both files'
    digests, written last) is whole: a crash, a full disk or a damaged file makes it be made again."""

    def read(suffix: str) -> bytes:  # as untrusted: a FIFO or a link to /dev/zero in the cache is not waited on
        return read_file_bytes(path.with_suffix(suffix), MAX_MODEL_BYTES, "a cached int8 model file", DataError)

    try:
        record = json.loads(read(".json"))
        return all(hashlib.sha256(read(suffix)).hexdigest() == record.get(suffix) for suffix in (".xml", ".bin"))
    except (OSError, DataError, ValueError, AttributeError):  # missing, not a file, unreadable, damaged
        return False


def _keep(path: Path, quantized: object, cache_dir: Path) -> Path:
    """``quantized`` saved as the cache entry ``path``: each file written whole
    (:mod:`covidseg.core.writing`), the weights first and the record of both files' digests last;
    runs at once write the same bytes."""
    import openvino

    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".int8-") as folder:
        written = Path(folder, "model.xml")
        try:
            openvino.save_model(quantized, str(written), compress_to_fp16=False)
        except RuntimeError as error:  # OpenVINO's writer reports a full disk as an iostream error
            reason = (str(error).splitlines() or ["?"])[-1][:200]
            raise DataError(
                f"paths.cache_dir={printable(cache_dir)!r}: the int8 graph could not be written there (a full disk?): "
                f"{reason}"
            ) from None
        contents = {suffix: written.with_suffix(suffix).read_bytes() for suffix in (".bin", ".xml")}
    for suffix, content in contents.items():
        write_atomic(path.with_suffix(suffix), content)
    record = {suffix: hashlib.sha256(content).hexdigest() for suffix, content in contents.items()}
    write_atomic(path.with_suffix(".json"), json.dumps(record, sort_keys=True) + "\n")
    return path


def cached_int8(graph: Path, calibration: str | None, image_size: int, cache_dir: Path) -> Path:
    """The int8 OpenVINO model (``.xml`` and ``.bin``) of the fp32 ONNX ``graph`` calibrated on
    ``calibration``'s X-rays, made once into ``<cache_dir>/graphs`` (:func:`_digest` names it) and
    made again when it is not whole."""
    files = calibration_files(calibration)
    path = Path(cache_dir) / "graphs" / f"{_digest(graph, files)}.int8.xml"
    if _kept(path):
        return path
    log.info("openvino_int8: calibrating on %d X-rays of %s (once; kept in %s)", len(files), printable(calibration),
             printable(path.parent))  # fmt: skip
    return _keep(path, quantize_int8(graph, calibration_batch(files, image_size)), cache_dir)


def _model_digest(path: Path) -> str | None:
    """:func:`int8_digest` of the kept int8 model ``path`` (70 ms for the shipped pair), or ``None``
    where OpenVINO cannot read it: a kept model is used only if it is the one a model file describes,
    whatever was written into the cache after it."""
    import openvino

    try:
        return int8_digest(openvino.Core().read_model(str(path)))
    except Exception:  # OpenVINO's own errors for a damaged file
        return None


def cached_shipped_int8(
    graph: Path, ranges: np.ndarray, digests: tuple[str, ...], image_size: int, cache_dir: Path
) -> Path:
    """The int8 OpenVINO model that a model file's ranges and digests describe, rebuilt once from the
    ONNX ``graph`` (:func:`rebuild_int8`) into ``<cache_dir>/graphs``. A rebuild that does not match
    is noted there too, per kind of CPU (a cache may be shared by machines), so later runs with the
    same graph, ranges, versions and CPU refuse at once."""
    key = hashlib.sha256(np.ascontiguousarray(ranges, np.float32).tobytes())
    key.update(_digest(graph, []).encode())
    path = Path(cache_dir) / "graphs" / f"{key.hexdigest()[:32]}.int8.xml"
    if _kept(path):
        if _model_digest(path) in digests:
            return path
        log.warning("openvino_int8: the kept int8 model %s is not the one the model file describes: made again",
                    printable(path))  # fmt: skip
    note = hashlib.sha256(f"{sorted(digests)} {cpu_identity()}".encode()).hexdigest()[:16]
    failed = path.with_suffix(f".{note}.failed")
    try:
        said = read_file_bytes(failed, 4096, "a note of an int8 model that did not match", DataError).decode().strip()
    except (OSError, DataError, UnicodeDecodeError):  # none, or not one covidseg wrote: try again
        said = ""
    if said:
        raise ModelFileError(said)
    log.info("openvino_int8: making the int8 model from the file's ranges (once; kept in %s)", printable(path.parent))
    try:
        model = rebuild_int8(graph, ranges, digests, image_size)
    except ModelFileError as error:
        with contextlib.suppress(OSError):  # a read-only cache: tried again next time
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(failed, f"{error}\n")
        raise
    return _keep(path, model, cache_dir)
