"""Model files are untrusted: plain data only, validated before anything is built, and refused with
one line naming the file and the key by every entry point (eval, calibrate, predict, export, resume)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from helpers import run_command

from covidseg.calibrate import calibrate
from covidseg.core.errors import ModelFileError, user_errors
from covidseg.distill import write_teacher_targets
from covidseg.eval import evaluate
from covidseg.inference.exporters import export_onnx, export_safetensors
from covidseg.inference.loader import PRETRAINED_MODELS, load_predictor, resolve_model_paths
from covidseg.inference.model_spec import parse_spec
from covidseg.predict import main as predict_main
from covidseg.predict import predict
from covidseg.train import train

VALID = {"networks": [{"name": "unet", "options": {"base_width": 4}}], "targets": ["infection"], "image_size": 64}


def _with(path: str, value) -> dict:
    """``VALID`` with one dotted key set (a list index as a number)."""
    spec = json.loads(json.dumps(VALID))
    *parents, last = path.split(".")
    node = spec
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    node[int(last) if last.isdigit() else last] = value
    return spec


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (_with("networks.0.name", "os.system"), "'networks.0.name' = 'os.system': not one of covidseg's networks"),
        (_with("networks.0._target_", "pathlib.Path.write_text"), "'networks.0._target_' is a Hydra instantiation key"),
        (_with("metrics", {"note": {"_partial_": True}}), "'metrics.note._partial_' is a Hydra instantiation key"),
        (_with("networks.0.options.norm_layer", "torch.nn.Identity"), "option 'norm_layer'"),
        (_with("networks.0.options.depth", 9), "option 'depth' = 9"),
        (_with("networks.0.options.depth", True), "option 'depth' = True"),
        (_with("networks.0.options.base_width", "4"), "option 'base_width' = '4'"),
        (_with("image_size", 100), "needs sides divisible by 16, got 100"),
        (_with("image_size", 0), "'image_size' = 0"),
        (_with("targets", ["infection", "infection"]), "repeat a name"),
        (_with("targets", ["lung", "infection"]), "1 output channel(s) for targets"),
        (_with("targets", ["tumour"]), "'targets.0' = 'tumour'"),
        (_with("inference", {"threshold": float("nan")}), "'inference.threshold' = nan"),
        (_with("inference", {"threshold": 1.5}), "'inference.threshold' = 1.5"),
        (_with("inference", {"presence_threshold": 0.5}), "needs networks with a presence head"),
        (_with("inference", {"restrict_to_lungs": True}), "needs the targets lung and infection"),
        (_with("normalization", "imagenet"), "'normalization' = 'imagenet'"),
        (_with("format_version", 2), "'format_version' = 2"),
        (_with("extra", 1), "'extra' = 1: Extra inputs are not permitted"),
        (_with("networks", []), "'networks'"),
        ([VALID], "the model spec is list, expected a mapping"),
    ],
)
def test_bad_specs_are_refused_with_the_key_and_value(spec, message: str) -> None:
    with pytest.raises(ModelFileError) as error:
        parse_spec(spec, "model.yaml")
    text = str(error.value)
    assert text.startswith("model.yaml: key ") or text.startswith("model.yaml: the model spec")
    assert message in text and "\n" not in text


def test_deeply_nested_and_malformed_metadata_is_one_line(tmp_path: Path) -> None:
    deep: dict = {}
    node = deep
    for _ in range(5000):
        node["x"] = {}
        node = node["x"]
    node["_target_"] = "os.system"
    with pytest.raises(ModelFileError, match=r"key 'x\.x\..*\._target_' is a Hydra instantiation key"):
        parse_spec(deep, "deep.yaml")
    from covidseg.inference.loader import read_onnx_metadata

    onnx = tmp_path / "model.onnx"
    for text, message in [
        ("[" * 100000, "is not valid JSON"),
        ("\udcff", "is not valid JSON"),
        ("[]", "key '\\(top level\\)': Input should be a valid dictionary"),
    ]:
        onnx.with_suffix(".json").write_text(text, errors="surrogateescape")
        with pytest.raises(ModelFileError, match=message):
            read_onnx_metadata(onnx)


def test_a_small_file_that_stands_for_a_billion_values_is_refused_at_once(tmp_path: Path) -> None:
    """ "Billion laughs": a list holding one list ten times, nine levels deep, is a kilobyte and a
    billion values to walk; in a .ckpt (pickle's memo), a .yaml spec (aliases) or an oversized spec."""
    from covidseg.inference.loader import MAX_SPEC_BYTES

    laughs: list = ["lol"] * 10
    for _ in range(8):
        laughs = [laughs] * 10
    torch.save({"state_dict": {}, "covidseg_model": {"networks": laughs}}, tmp_path / "laughs.ckpt")
    assert (tmp_path / "laughs.ckpt").stat().st_size < 5000
    weights = tmp_path / "model.safetensors"
    export_safetensors(load_predictor("pretrained", tmp_path), weights)
    anchors = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    anchors += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)] + ["networks: *a8"]
    cases = {
        "laughs.ckpt": (None, "more than 100,000 values outside the tensors"),
        "model.safetensors": ("\n".join(anchors), "anchors and aliases are not allowed"),
        "big": ("networks: []\n" + "#" * MAX_SPEC_BYTES, f"bytes; a model's spec is under {MAX_SPEC_BYTES:,}"),
    }
    for name, (spec, message) in cases.items():
        if spec is not None:
            weights.with_suffix(".yaml").write_text(spec)
        with pytest.raises(ModelFileError, match=message):  # refused, not walked: the walk would take hours
            load_predictor(str(tmp_path / (name if name.endswith(".ckpt") else "model.safetensors")), tmp_path)


def test_a_valid_spec_keeps_its_values_and_fills_the_defaults() -> None:
    spec = parse_spec(_with("networks.0.input_size", 32), "model.yaml")
    assert spec.networks[0].input_size == 32 and spec.inference.threshold == 0.5 and spec.primary_target == "infection"
    assert parse_spec(spec.to_plain(), "again") == spec


# --- crafted files against every entry point ----------------------------------------------------


def _payload(target: Path) -> dict:
    """What an attacker would store: a config node that makes Hydra write a file."""
    return {"_target_": "pathlib.Path.write_text", "self": str(target), "data": "pwned"}


def _crafted_files(source: Path, folder: Path, pwned: Path) -> dict[str, Path]:
    """A checkpoint from a real run, tampered with in each place a model file keeps plain data."""
    folder.mkdir()
    checkpoint = torch.load(source, weights_only=True)
    files = {}
    in_spec = json.loads(json.dumps(checkpoint["covidseg_model"]))
    in_spec["networks"][0]["options"] = _payload(pwned)
    files["spec"] = folder / "spec.ckpt"
    torch.save(checkpoint | {"covidseg_model": in_spec}, files["spec"])
    files["legacy_config"] = folder / "legacy.ckpt"  # the covidseg 0.1 layout, run through instantiate before
    legacy = {"model": {"_target_": "pathlib.Path.write_text", "self": str(pwned), "data": "pwned"}}
    torch.save({key: v for key, v in checkpoint.items() if key != "covidseg_model"} | {"covidseg_config": legacy},
               files["legacy_config"])  # fmt: skip
    files["hyper_parameters"] = folder / "hparams.ckpt"
    torch.save(checkpoint | {"hyper_parameters": {"net": _payload(pwned)}}, files["hyper_parameters"])
    loaded = load_predictor(str(source), folder)
    bundle = export_safetensors(loaded, folder / "bundle" / "model.safetensors")
    spec = yaml.safe_load(bundle.with_suffix(".yaml").read_text())
    spec["networks"][0]["name"] = _payload(pwned)
    bundle.with_suffix(".yaml").write_text(yaml.safe_dump(spec))
    files["safetensors_yaml"] = bundle
    onnx = export_onnx(loaded, folder / "onnx" / "model.onnx")
    metadata = json.loads(onnx.with_suffix(".json").read_text())
    metadata["model"]["inference"] = _payload(pwned)
    onnx.with_suffix(".json").write_text(json.dumps(metadata))
    files["onnx_json"] = onnx
    return files


@pytest.fixture(scope="module")
def crafted(trained_checkpoints: list[Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    folder = tmp_path_factory.mktemp("crafted")
    pwned = folder / "pwned.txt"
    return _crafted_files(trained_checkpoints[0], folder / "files", pwned), pwned


ENTRY_POINTS: dict[str, tuple[str, Callable, list[str]]] = {
    "eval": ("eval", evaluate, ["data.split=Val"]),
    "calibrate": ("calibrate", calibrate, []),
    "distill": ("distill", write_teacher_targets, []),
    "predict": ("predict", predict, []),
    "export": ("export", None, ["format=onnx"]),
    "resume": ("train", train, []),
}
SYNTHETIC = ["data=synthetic", "data.image_size=64", "data.synthetic.image_size=64",
             "data.synthetic.counts={Train: 8, Val: 4, Test: 4}"]  # fmt: skip


KINDS = ["spec", "legacy_config", "hyper_parameters", "safetensors_yaml", "onnx_json"]
CHECKPOINT_KINDS = ("spec", "legacy_config", "hyper_parameters")  # training resumes from .ckpt files only
CASES = [(entry, kind) for entry in ENTRY_POINTS for kind in KINDS if entry != "resume" or kind in CHECKPOINT_KINDS]


@pytest.mark.slow
@pytest.mark.parametrize(("entry", "kind"), CASES)
def test_every_entry_point_refuses_a_crafted_file_and_writes_nothing(
    entry: str, kind: str, crafted, compose_cfg, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import covidseg.export as export_module

    files, pwned = crafted
    path = files[kind]
    config_name, run, extra = ENTRY_POINTS[entry]
    images = tmp_path / "images"
    images.mkdir()
    torch.manual_seed(0)
    import cv2

    cv2.imwrite(str(images / "x.png"), (torch.rand(70, 90) * 255).byte().numpy())
    output = tmp_path / "user_output"
    overrides = [f"ckpt_path={path}", *extra]
    if entry == "predict":
        overrides += [f"input={images}", f"output={output}"]
    elif entry == "export":
        overrides += [f"output={output}"]
    else:
        overrides += SYNTHETIC + ["model.net.base_width=4"] * (entry == "resume")
    cfg = compose_cfg(config_name, overrides)
    if entry == "export":
        run = export_module.main.__wrapped__
    with pytest.raises(SystemExit) as exit_info, user_errors():
        run(cfg)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("error:") and len(message.splitlines()) == 1, message
    if kind == "onnx_json" and entry != "predict":
        assert f"{str(path)!r}: an ONNX graph runs in predict only" in message
    else:
        named = {"onnx_json": path.with_suffix(".json"), "safetensors_yaml": path.with_suffix(".yaml")}.get(kind, path)
        assert f"error: {str(named)!r}: key " in message and "is a Hydra instantiation key" in message
    assert not pwned.exists() and not output.exists()


def test_missing_model_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="ckpt_path 'nope.ckpt' does not exist"):
        load_predictor("nope.ckpt", tmp_path)
    with pytest.raises(ModelFileError, match="ckpt_path=last:train: no checkpoints/last.ckpt under"):
        load_predictor("last", tmp_path)
    with pytest.raises(ModelFileError, match="last:..: a task name is letters"):
        load_predictor("last:..", tmp_path)
    with pytest.raises(ModelFileError, match=r"is a folder without model.safetensors, model.onnx or \*/checkpoints/"):
        load_predictor(str(tmp_path), tmp_path)
    (tmp_path / "0" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ModelFileError, match="holds runs but is not a multirun"):
        load_predictor(str(tmp_path), tmp_path)
    (tmp_path / "multirun.yaml").write_text("hydra: {}\n")
    with pytest.raises(ModelFileError, match="has no best checkpoint"):
        load_predictor(str(tmp_path), tmp_path)
    with pytest.raises(ModelFileError, match=r"ckpt_path=\[\] names no model"):
        load_predictor([], tmp_path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"just some text\n", "is not a checkpoint covidseg can read without unpickling"),
        (b"", "is not a checkpoint covidseg can read without unpickling"),
    ],
)
def test_files_that_are_not_checkpoints_are_named(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "model.ckpt"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match=message):
        load_predictor(str(path), tmp_path)


@pytest.mark.parametrize("name", ["model.ckpt", "model.safetensors", "model.onnx"])
def test_model_files_over_the_size_limit_are_refused_unread(tmp_path: Path, capsys, name: str) -> None:
    """A sparse 3 GiB file (no disk used): read, it would take 3 GiB of memory or more."""
    path = tmp_path / name
    path.touch()
    os.truncate(path, 3 * 1024**3)
    path.with_suffix(".yaml").write_text(yaml.safe_dump(VALID))
    path.with_suffix(".json").write_text("{}")
    if name.endswith(".onnx"):  # its metadata is checked first; the graph itself by the backend
        from covidseg.inference.segment import onnx_backend

        with pytest.raises(ModelFileError, match=r"is 3,221,225,472 bytes; an ONNX graph is under 2,147,483,648"):
            onnx_backend(path, ["probability"])
        return
    with pytest.raises(ModelFileError, match=r"is 3,221,225,472 bytes; a model file is under 2,147,483,648"):
        load_predictor(str(path), tmp_path)
    (tmp_path / "in").mkdir()
    cv2.imwrite(str(tmp_path / "in" / "xray.png"), np.full((64, 64), 128, np.uint8))
    assert run_command(predict_main, f"ckpt_path={path}", f"input={tmp_path / 'in'}", f"output={tmp_path / 'out'}",
                       f"paths.log_dir={tmp_path / 'outputs'}") == 2  # fmt: skip
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and str(path) in error and "3,221,225,472 bytes" in error, error
    assert not (tmp_path / "out").exists()


def test_an_onnx_graph_that_points_outside_its_folder_for_weights_is_refused(tmp_path: Path) -> None:
    """ONNX keeps large weights in "external data" files named inside the graph: a shared graph
    could name any file. ONNX Runtime, given the graph's path, refuses names outside its folder."""
    from onnx import TensorProto, helper, numpy_helper

    from covidseg.inference.segment import onnx_backend

    secret = tmp_path / "secret.bin"
    np.arange(4, dtype=np.float32).tofile(secret)
    weights = numpy_helper.from_array(np.zeros(4, np.float32), "w")
    weights.ClearField("raw_data")
    weights.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "../secret.bin"), ("offset", "0"), ("length", "16")):
        entry = weights.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [weights],
    )  # fmt: skip
    path = tmp_path / "model" / "model.onnx"
    path.parent.mkdir()
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    with pytest.raises(ModelFileError, match="is not an ONNX graph ONNX Runtime can run: .*escapes model directory"):
        onnx_backend(path, ["probability"])
    from covidseg.inference.segment import openvino_backend

    with pytest.raises(ModelFileError, match=r"keeps weights in other files \(ONNX external data\): not read"):
        openvino_backend(path, bf16=False, expected=["probability"])


@pytest.mark.slow
def test_weights_that_do_not_fit_their_spec_are_refused(trained_checkpoints: list[Path], tmp_path: Path) -> None:
    loaded = load_predictor(str(trained_checkpoints[0]), tmp_path)
    path = export_safetensors(loaded, tmp_path / "model.safetensors")
    spec = yaml.safe_load(path.with_suffix(".yaml").read_text())
    spec["networks"][0]["options"]["base_width"] = 8
    path.with_suffix(".yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ModelFileError, match="the weights do not fit its model spec"):
        load_predictor(str(path), tmp_path)
    path.with_suffix(".yaml").unlink()
    with pytest.raises(ModelFileError, match=r"model.yaml' is missing"):
        load_predictor(str(path), tmp_path)
    path.write_bytes(path.read_bytes()[:100])
    path.with_suffix(".yaml").write_text(yaml.safe_dump(loaded.spec.to_plain()))
    with pytest.raises(ModelFileError, match="not a readable safetensors file"):
        load_predictor(str(path), tmp_path)
    path.with_suffix(".yaml").write_text("networks: [unclosed\n")
    with pytest.raises(ModelFileError, match="is not valid YAML"):
        load_predictor(str(path), tmp_path)


def _as_legacy(checkpoint: dict) -> dict:
    """A covidseg 0.1 checkpoint: the run config with Hydra targets, the module's net at the top."""
    spec = checkpoint["covidseg_model"]
    network = spec["networks"][0]
    config = {
        "model": {"_target_": "covidseg.models.SegmentationModule", "threshold": 0.5, "presence_weight": 0.5,
                  "input_size": None, "channels_last": True, "flip_tta": False, "presence_threshold": 0.3,
                  "net": {"_target_": "covidseg.models.UNet", **network["options"]},
                  "optimizer": {"_target_": "torch.optim.Adam", "_partial_": True}},
        "data": {"_target_": "covidseg.data.CovidQuExDataModule", "targets": spec["targets"],
                 "image_size": spec["image_size"], "classes": ["COVID-19"]},
    }  # fmt: skip
    state = {name.removeprefix("network."): tensor for name, tensor in checkpoint["state_dict"].items()}
    rest = {key: value for key, value in checkpoint.items() if key not in ("covidseg_model", "state_dict")}
    return rest | {"state_dict": state, "covidseg_config": config}


@pytest.mark.slow
def test_convert_turns_a_legacy_checkpoint_into_one_that_loads_alike(trained_checkpoints, tmp_path: Path) -> None:
    from covidseg.convert import convert_checkpoint

    checkpoint = torch.load(trained_checkpoints[0], weights_only=True)
    legacy = tmp_path / "legacy.ckpt"
    torch.save(_as_legacy(checkpoint), legacy)
    with pytest.raises(ModelFileError, match="'covidseg_config.model._target_' is a Hydra instantiation key"):
        load_predictor(str(legacy), tmp_path)
    converted = tmp_path / "converted.ckpt"
    convert_checkpoint(legacy, converted)
    loaded, original = load_predictor(str(converted), tmp_path), load_predictor(str(trained_checkpoints[0]), tmp_path)
    assert loaded.spec.inference.presence_threshold == 0.3 and loaded.spec.networks == original.spec.networks
    batch = torch.rand(2, 1, 64, 64)
    ungated = original.predictor.predict(batch).probability
    loaded.predictor.settings = original.predictor.settings
    torch.testing.assert_close(loaded.predictor.predict(batch).probability, ungated)
    assert torch.load(converted, weights_only=True)["optimizer_states"]  # training can resume from it

    evil = _as_legacy(checkpoint)
    evil["covidseg_config"]["model"]["net"]["_target_"] = "pathlib.Path.write_text"
    torch.save(evil, legacy)
    with pytest.raises(ModelFileError, match="'model.net._target_' = 'pathlib.Path.write_text' is not one of"):
        convert_checkpoint(legacy, tmp_path / "never.ckpt")
    assert not (tmp_path / "never.ckpt").exists()


def test_last_finds_the_newest_last_checkpoint_of_the_named_task(tmp_path: Path) -> None:
    from covidseg.inference.loader import resolve_model_paths

    def last(task: str, run: str) -> Path:
        path = tmp_path / task / "runs" / run / "checkpoints" / "last.ckpt"
        path.parent.mkdir(parents=True)
        path.write_bytes(b"")
        return path

    older, newer, other = last("train", "a"), last("train", "b"), last("fast_cpu", "a")
    os.utime(older, (1, 1))
    assert resolve_model_paths("last", tmp_path) == [newer]
    assert resolve_model_paths("last:fast_cpu", tmp_path) == [other]
    assert resolve_model_paths(["last:train", "last:fast_cpu"], tmp_path) == [newer, other]


def test_the_shipped_models_are_named_and_an_unknown_name_is_refused(tmp_path: Path, monkeypatch) -> None:
    assert resolve_model_paths("pretrained", tmp_path) == [PRETRAINED_MODELS["pretrained"]]
    assert load_predictor("pretrained", tmp_path).spec.targets == ["lung", "infection"]  # severity out of the box
    assert resolve_model_paths("pretrained:lung_infection", tmp_path) == [PRETRAINED_MODELS["pretrained"]]
    assert load_predictor("pretrained:infection", tmp_path).spec.targets == ["infection"]  # the default before
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pretrained").mkdir()  # a folder of that name does not shadow the shipped model
    assert resolve_model_paths("pretrained", tmp_path) == [PRETRAINED_MODELS["pretrained"]]
    with pytest.raises(
        ModelFileError,
        match="'pretrained:lungs': the shipped models are pretrained, pretrained:lung_infection, pretrained:infection",
    ):
        resolve_model_paths("pretrained:lungs", tmp_path)
