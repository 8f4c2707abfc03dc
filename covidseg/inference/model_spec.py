"""What a model file may say about its model: plain values, validated before anything is built.

A checkpoint (key ``covidseg_model``), the ``.yaml`` beside a ``.safetensors`` file and the
``.json`` beside an exported ONNX graph all hold one :class:`ModelSpec`: the networks (names from
:mod:`covidseg.models.registry` with plain options), the targets, the image side, the normalisation
and the inference settings. Unknown keys, wrong types, values out of range, unknown network names
and Hydra's instantiation keys (``_target_`` and the like) anywhere in the file are refused with one
line naming the file and the key. pydantic does the type and range checks.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from covidseg.core.errors import ModelFileError
from covidseg.core.labels import CLASSES, TARGETS
from covidseg.core.validation import first_error
from covidseg.models.registry import NETWORKS

SPEC_KEY = "covidseg_model"
LEGACY_CONFIG_KEY = "covidseg_config"  # covidseg 0.1 stored the whole run config, Hydra targets and all
FORMAT_VERSION = 1
HYDRA_KEYS = frozenset({"_target_", "_partial_", "_args_", "_recursive_", "_convert_"})
NORMALIZATION = "gray_divided_by_255"
Scalar = str | bool | int | float | None


class _Plain(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class InferenceSettings(_Plain):
    """How probabilities become an answer; eval, calibrate, predict and export may override each."""

    threshold: float = Field(0.5, gt=0, lt=1)
    presence_threshold: float | None = Field(None, ge=0, le=1)
    flip_tta: bool = False
    restrict_to_lungs: bool = False
    # connected regions of the mask smaller than this share of the image are dropped, all but the largest
    min_region_share: float = Field(0.0, ge=0, lt=1)


APPLIED_AFTER_GRAPH = ("threshold", "min_region_share")  # to a graph's probabilities, so not part of it
GRAPH_SETTINGS = tuple(key for key in InferenceSettings.model_fields if key not in APPLIED_AFTER_GRAPH)  # baked in


class NetworkSpec(_Plain):
    """One network: a registry name, its plain options, and how it is run."""

    name: str
    options: dict[str, Any] = {}
    presence_head: bool = False
    input_size: int | None = Field(None, ge=16, le=4096)
    channels_last: bool = False

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        if name not in NETWORKS:
            raise ValueError(f"not one of covidseg's networks ({', '.join(NETWORKS)})")
        return name

    @model_validator(mode="after")
    def _options_fit_the_network(self) -> NetworkSpec:
        try:
            NETWORKS[self.name].options.model_validate(self.options)
        except ValidationError as error:
            first = error.errors()[0]
            key = ".".join(str(part) for part in first["loc"])
            raise ValueError(f"option {key!r} = {_short(first.get('input'))}: {first['msg']}") from None
        return self

    def side_multiple(self) -> int:
        entry = NETWORKS[self.name]
        return entry.side_multiple(entry.options.model_validate(self.options).depth)


class DataProvenance(_Plain):
    """What the model was trained and validated on (for people; nothing is built from it)."""

    classes: list[Literal[CLASSES]] = Field(default_factory=list, max_length=3)  # type: ignore[valid-type]
    eval_classes: list[Literal[CLASSES]] = Field(default_factory=list, max_length=3)  # type: ignore[valid-type]


class XrayCheckSpec(_Plain):
    """The model's "does this look like a chest X-ray?" reference (:mod:`covidseg.inference.xray_check`):
    its tensors ``xray_check.mean``, ``.scale`` (``feature_count``) and ``.basis`` (``components`` x
    ``feature_count``) are in the model file; images scoring above ``threshold`` are refused."""

    feature_count: int = Field(ge=2, le=10_000)  # covidseg's networks have a few hundred
    components: int = Field(ge=1, le=1_000)
    threshold: float = Field(gt=0, allow_inf_nan=False)
    reference: str = Field("", max_length=500)  # for people: which images the statistics come from

    @model_validator(mode="after")
    def _fewer_components(self) -> XrayCheckSpec:
        if self.components >= self.feature_count:
            raise ValueError(f"components {self.components} must be fewer than feature_count {self.feature_count}")
        return self


INT8_RANGES = "int8.ranges"  # the model file's tensor of int8 ranges
INT8_METRICS = "int8_"  # metrics measured with the int8 ranges: they go when the ranges do
PRINTABLE = r"^[^\x00-\x1f\x7f]*$"  # text shown on a terminal or a card: no control characters


class Int8Spec(_Plain):
    """The model's int8 calibration for OpenVINO (:mod:`covidseg.inference.quantize`): its tensor
    ``int8.ranges`` (``quantizers`` x 4, each quantizer's input and output low and high, in graph
    order) is in the model file, and ``digest`` names the int8 model they make, which a rebuilt one
    must match to be used (a check that it is the model measured, not a proof of who made it).
    ``rebuilt_digests`` name the models the same ranges make on other CPUs: NNCF and OpenVINO place
    the same quantizers there but make some constants otherwise (seen between an AMD EPYC and an
    Intel Xeon with AMX, the same versions), and each was added after a calibration on that CPU gave
    the same ranges to float32 rounding (at most 1.4e-7 apart, relative). The graph it was measured
    on held the settings below; a command that changes one runs without int8."""

    quantizers: int = Field(ge=1, le=100_000)
    digest: str = Field(pattern=r"^[0-9a-f]{64}$")
    rebuilt_digests: list[Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]] = Field(default_factory=list, max_length=8)
    calibration: str = Field("", max_length=500, pattern=PRINTABLE)  # for people: which images
    versions: dict[str, Annotated[str, Field(max_length=100, pattern=PRINTABLE)]] = Field(
        default_factory=dict, max_length=10
    )  # nncf, openvino, torch that made it
    # int8 moves the presence probability, so the int8 model may have a gate of its own
    presence_threshold: float | None = Field(None, ge=0, le=1)
    flip_tta: bool = False
    restrict_to_lungs: bool = False

    @model_validator(mode="after")
    def _each_digest_once(self) -> Int8Spec:
        if len(set(self.accepted_digests)) != len(self.accepted_digests):
            raise ValueError("each digest once: rebuilt_digests repeats one, or holds digest itself")
        return self

    @property
    def accepted_digests(self) -> tuple[str, ...]:
        """The int8 models these ranges may rebuild into: the measured one first."""
        return (self.digest, *self.rebuilt_digests)


class ModelSpec(_Plain):
    """Everything needed to rebuild a model and turn its output into masks."""

    format_version: Literal[1] = FORMAT_VERSION
    networks: list[NetworkSpec] = Field(min_length=1, max_length=64)
    targets: list[Literal[TARGETS]] = Field(min_length=1, max_length=2)  # type: ignore[valid-type]
    image_size: int = Field(ge=16, le=4096)
    normalization: Literal["gray_divided_by_255"] = NORMALIZATION
    inference: InferenceSettings = InferenceSettings()
    data: DataProvenance = DataProvenance()
    metrics: dict[str, Scalar] = Field(default_factory=dict, max_length=200)
    xray_check: XrayCheckSpec | None = None
    int8: Int8Spec | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"targets {self.targets} repeat a name")
        for index, network in enumerate(self.networks):
            out_channels = network.options.get("out_channels", 1)
            if out_channels != len(self.targets):
                raise ValueError(f"networks.{index} has {out_channels} output channel(s) for targets {self.targets}")
            side = network.input_size or self.image_size
            if side % network.side_multiple():
                raise ValueError(
                    f"networks.{index} ({network.name}) needs sides divisible by {network.side_multiple()}, got {side}"
                )
        heads = {network.presence_head for network in self.networks}
        if len(heads) > 1:
            raise ValueError("the networks disagree on the presence head: all or none must have one")
        if self.inference.presence_threshold is not None and heads != {True}:
            raise ValueError("inference.presence_threshold needs networks with a presence head")
        if self.int8 is not None and self.int8.presence_threshold is not None and heads != {True}:
            raise ValueError("int8.presence_threshold needs networks with a presence head")
        if self.inference.restrict_to_lungs and set(self.targets) != set(TARGETS):
            raise ValueError("inference.restrict_to_lungs needs the targets lung and infection")
        return self

    @property
    def primary_target(self) -> str:
        return "infection" if "infection" in self.targets else self.targets[0]

    @property
    def has_presence(self) -> bool:
        return self.networks[0].presence_head

    @property
    def graph_outputs(self) -> list[str]:
        """The outputs of the model's exported graph, in order (what its ``.json`` lists)."""
        return ["probability"] + ["presence"] * self.has_presence + ["xray_score"] * (self.xray_check is not None)

    def with_inference(self, **overrides: Any) -> ModelSpec:
        """A copy with some inference settings replaced (``None`` values keep the file's), validated."""
        changed = {key: value for key, value in overrides.items() if value is not None}
        data = self.model_dump()
        data["inference"] |= changed
        return parse_spec(data, "the command line")

    def without_int8(self) -> ModelSpec:
        """A copy without int8 ranges and the metrics measured with them: for a file that does not
        carry them."""
        metrics = {key: value for key, value in self.metrics.items() if not key.startswith(INT8_METRICS)}
        return self.model_copy(update={"int8": None, "metrics": metrics})

    def to_plain(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class ExportMetadata(_Plain):
    """The ``.json`` beside an exported model: how to feed it and read it, and its model spec."""

    format: Literal["onnx", "torchscript", "safetensors"]
    input: str = Field(max_length=500)
    outputs: list[Literal["probability", "presence", "xray_score"]] = Field(min_length=1, max_length=3)
    model: dict[str, Any]


def parse_export_metadata(data: Any, source: str) -> tuple[ExportMetadata, ModelSpec]:
    """Validate an export's metadata and the model spec inside it."""
    refuse_hydra_keys(data, source)
    try:
        metadata = ExportMetadata.model_validate(data)
    except ValidationError as error:
        raise ModelFileError(_one_line(error, source)) from None
    return metadata, parse_spec(metadata.model, source)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


MAX_PLAIN_VALUES = 100_000  # values outside a model file's tensors; covidseg's own hold about 700


def hydra_keys(data: Any) -> Iterator[str]:
    """Dotted paths of every Hydra instantiation key in nested dicts and lists (iteratively: a
    crafted file may nest deeper than Python's recursion limit). ``OverflowError`` after
    :data:`MAX_PLAIN_VALUES` values: a list that holds the same list ten times, nine levels deep, is
    a few hundred bytes of pickle or YAML and a billion values to walk."""
    stack: list[tuple[str, Any]] = [("", data)]
    walked = 0
    while stack:
        path, node = stack.pop()
        if isinstance(node, Mapping):
            items = [(str(key), value) for key, value in node.items()]
        elif isinstance(node, list | tuple):
            items = [(str(index), value) for index, value in enumerate(node)]
        else:
            continue
        walked += len(items)
        if walked > MAX_PLAIN_VALUES:
            raise OverflowError(f"more than {MAX_PLAIN_VALUES:,} values outside the tensors")
        for key, value in reversed(items):
            where = f"{path}.{key}" if path else key
            if key in HYDRA_KEYS:
                yield where
            stack.append((where, value))


def refuse_hydra_keys(data: Any, source: str) -> None:
    """A model file may carry plain data only, never a key that makes Hydra choose code to run."""
    try:
        found = next(hydra_keys(data), None)
    except OverflowError as error:
        raise ModelFileError(
            f"{source}: {error} (or one list many times over): not a model file covidseg wrote"
        ) from None
    if found is not None:
        legacy = found.startswith(f"{LEGACY_CONFIG_KEY}.")
        hint = " (a covidseg 0.1 checkpoint: if you trust it, convert it with python -m covidseg.convert)" * legacy
        raise ModelFileError(
            f"{source}: key {found!r} is a Hydra instantiation key; a model file may hold plain data only{hint}"
        )


def parse_spec(data: Any, source: str) -> ModelSpec:
    """Validate a model spec read from ``source``; one line names the first bad key."""
    refuse_hydra_keys(data, source)
    if not isinstance(data, Mapping):
        raise ModelFileError(f"{source}: the model spec is {type(data).__name__}, expected a mapping")
    try:
        return ModelSpec.model_validate(dict(data))
    except ValidationError as error:
        raise ModelFileError(_one_line(error, source)) from None


def _one_line(error: ValidationError, source: str) -> str:
    """``<source>: key '<dotted key>' = <value>: <what was expected>`` (no value for a missing key
    or a whole section)."""
    key, value, message = first_error(error)
    missing = error.errors()[0]["type"] == "missing"
    shown = "" if missing or isinstance(value, Mapping | list) else f" = {_short(value)}"
    return f"{source}: key {key or '(top level)'!r}{shown}: {message}"


def spec_from_run_config(
    name: str,
    model: Mapping[str, Any],
    data: Mapping[str, Any],
    source: str,
    inference_keys: tuple[str, ...] = ("threshold",),
    metrics: Mapping[str, Any] | None = None,
) -> ModelSpec:
    """The model spec of a run config's ``model`` and ``data`` sections (plain values read, nothing
    built), for the registered network ``name``; ``inference_keys`` of ``model`` become its settings."""
    net = model["net"]
    option_names = NETWORKS[name].options.model_fields
    unsupported = sorted(set(net) - set(option_names) - HYDRA_KEYS)
    if unsupported:
        raise ModelFileError(f"{source}: model.net options {unsupported} cannot be stored in a model file")
    spec = {
        "networks": [
            {
                "name": name,
                "options": {key: value for key, value in net.items() if key in option_names},
                "presence_head": float(model.get("presence_weight") or 0) > 0,
                "input_size": model.get("input_size"),
                "channels_last": bool(model.get("channels_last", False)),
            }
        ],
        "targets": list(data["targets"]),
        "image_size": data["image_size"],
        "inference": {key: model[key] for key in inference_keys if model.get(key) is not None},
        "data": {
            key: [label for label in (data.get(key) or data.get("classes") or []) if label in CLASSES]
            for key in ("classes", "eval_classes")
        },
        "metrics": dict(metrics or {}),
    }
    return parse_spec(spec, source)
