"""backend=openvino_int8: a model's graph quantized once on X-rays the user names, then kept."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import os
import re
import warnings
from pathlib import Path

import cv2
import numpy as np
import openvino
import pytest
import safetensors.torch
import torch
import yaml
from conftest import FAST
from helpers import run_command
from torch import nn

from covidseg.core.errors import ConfigError, DataError, ModelFileError
from covidseg.inference import quantize, segment
from covidseg.inference.exporters import export_onnx
from covidseg.inference.loader import INFERENCE_KEYS, load_predictor
from covidseg.inference.model_spec import Int8Spec
from covidseg.predict import main as predict_main

NO_OVERRIDES = dict.fromkeys(INFERENCE_KEYS)


class TwoBranches(nn.Module):
    """Two convolutions read the image; a third reads only what they made."""

    def __init__(self) -> None:
        super().__init__()
        self.left, self.right = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(1, 4, 3, padding=1)
        self.after = nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.after(torch.relu(self.left(image * 2)) + self.right(image))


def test_the_first_convolutions_are_those_that_read_the_image(tmp_path: Path) -> None:
    graph = tmp_path / "two.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter, as covidseg's own export
        torch.onnx.export(TwoBranches(), (torch.rand(1, 1, 16, 16),), str(graph), dynamo=False)
    found = quantize.first_convolutions(openvino.Core().read_model(str(graph)))
    assert sorted(name.split("/")[1] for name in found) == ["left", "right"]


@pytest.mark.parametrize("value", ["", "   ", 3])
def test_int8_with_a_blank_calibration_is_refused_before_the_model_is_read(value, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"int8_calibration=.*int8 needs X-rays to calibrate on"):
        segment.load_backend("missing.ckpt", tmp_path, "openvino_int8", NO_OVERRIDES, False, tmp_path, False, value)


def test_calibration_folders_without_x_rays_are_named(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="^int8_calibration='.*empty': '.*empty' names no image files"):
        quantize.calibration_files(str(tmp_path / "empty"))
    colour = np.zeros((64, 64, 3), np.uint8)
    colour[..., 2] = 255
    cv2.imwrite(str(tmp_path / "red.png"), colour)
    with pytest.raises(DataError, match="red.png"):
        quantize.calibration_batch(quantize.calibration_files(str(tmp_path / "red.png")), 64)


def test_a_fifo_among_calibration_images_is_refused_not_waited_on(tmp_path: Path) -> None:
    graph = tmp_path / "graph.onnx"
    graph.write_bytes(b"")
    graph.with_suffix(".json").write_bytes(b"{}")
    (tmp_path / "xrays").mkdir()
    os.mkfifo(tmp_path / "xrays" / "xray.png")  # listed by the folder's search; no writer: a read would block
    with pytest.raises(DataError, match="xray.png.*not a regular file"):
        quantize.cached_int8(graph, str(tmp_path / "xrays"), 64, tmp_path / "cache")


def test_calibration_draws_at_most_300_images_evenly(tmp_path: Path) -> None:
    for index in range(700):
        (tmp_path / f"{index:04d}.png").write_bytes(b"")  # found by name; not read here
    files = quantize.calibration_files(str(tmp_path))
    assert len(files) == 300 and files[0].name == "0000.png" and files[-1].name == "0699.png"
    assert files == sorted(files) and len(set(files)) == 300
    for folder, count in (("covid", 300), ("normal", 299)):  # just under twice the limit: both halves drawn
        (tmp_path / "two" / folder).mkdir(parents=True)
        for index in range(count):
            (tmp_path / "two" / folder / f"{index:03d}.png").write_bytes(b"")
    drawn = [path.parent.name for path in quantize.calibration_files(str(tmp_path / "two"))]
    assert drawn.count("covid") == 150 and drawn.count("normal") == 150


def test_int8_without_calibration_images_or_ranges_in_the_model_exits_2_in_one_line(tmp_path: Path, capsys) -> None:
    from covidseg.predict import main

    (tmp_path / "in").mkdir()
    cv2.imwrite(str(tmp_path / "in" / "xray.png"), np.full((64, 64), 128, np.uint8))
    code = run_command(main, "ckpt_path=pretrained:infection", f"input={tmp_path / 'in'}",
                       f"output={tmp_path / 'out'}", "backend=openvino_int8")  # fmt: skip
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1 and "int8_calibration=None" in error[0] and "int8 ranges" in error[0]


@pytest.mark.slow
def test_int8_answers_like_fp32_and_is_calibrated_once(compose_cfg, trained_checkpoints, tmp_path, monkeypatch) -> None:
    from covidseg.eval import evaluate
    from covidseg.predict import predict

    checkpoint = trained_checkpoints[0]
    data = [o for o in FAST if o.startswith("data")]
    cfg = compose_cfg("eval", [f"ckpt_path={checkpoint}", *data])
    phantoms = Path(cfg.data.root)
    calibration = f"int8_calibration={phantoms}/Train/*/images/*.png"
    xrays = phantoms / "Val" / "COVID-19" / "images"

    def rows(output: str, *extra: str) -> list[dict]:
        overrides = [f"ckpt_path={checkpoint}", f"input={xrays}", f"output={tmp_path / output}", "bf16=false", *extra]
        with predict(compose_cfg("predict", overrides)).csv_path.open() as handle:
            return list(csv.DictReader(handle))

    fp32 = rows("fp32", "backend=openvino")
    int8 = rows("int8", "backend=openvino_int8", calibration)
    assert [row["file"] for row in int8] == [row["file"] for row in fp32] and fp32
    for row in fp32:
        name = Path(row["file"]).name
        masks = [cv2.imread(str(tmp_path / kind / name) + ".mask.png", 0) > 0 for kind in ("fp32", "int8")]
        assert (masks[0] != masks[1]).mean() <= 0.05, name
    graphs = Path(cfg.paths.cache_dir) / "graphs"
    made = sorted(graphs.glob("*.int8.*"))
    assert [path.suffix for path in made] == [".bin", ".json", ".xml"]  # the record of both files' digests

    def never(*args):
        raise AssertionError("calibrated again")

    monkeypatch.setattr(quantize, "quantize_int8", never)  # the kept graph is reused by predict and eval
    assert len(rows("again", "backend=openvino_int8", calibration)) == len(fp32)
    scores = {
        backend: evaluate(compose_cfg("eval", [f"ckpt_path={checkpoint}", *data, f"backend={backend}", calibration]))
        for backend in ("torch", "openvino_int8")
    }
    assert scores["openvino_int8"]["test/dice"] == pytest.approx(scores["torch"]["test/dice"], abs=0.03)
    report = Path(compose_cfg("eval", []).paths.output_dir) / "report.html"  # the last eval's: says what it ran
    assert "(openvino_int8)" in report.read_text()
    ran = json.loads((report.parent / "run_info.json").read_text())
    assert ran["backend"] == "openvino_int8" and ran["bf16"] is False
    assert sorted(graphs.glob("*.int8.*")) == made
    monkeypatch.undo()
    other = f"int8_calibration={phantoms}/Train/COVID-19/images/*.png"  # another int8 graph: not resumed
    with pytest.raises(DataError, match="other settings"):
        rows("int8", "backend=openvino_int8", other)


@pytest.mark.slow
def test_each_graph_gets_its_own_int8_model_and_a_damaged_one_is_made_again(
    compose_cfg, trained_checkpoints, tmp_path, monkeypatch
) -> None:
    cfg = compose_cfg("eval", [f"ckpt_path={trained_checkpoints[0]}", *(o for o in FAST if o.startswith("data"))])
    calibration = f"{cfg.data.root}/Train/*/images/*.png"
    graphs = [  # two exports, both named model.onnx
        export_onnx(load_predictor(str(checkpoint), tmp_path), tmp_path / f"export{index}" / "model.onnx")
        for index, checkpoint in enumerate(trained_checkpoints)
    ]
    cache = tmp_path / "cache"
    made = [quantize.cached_int8(graph, calibration, 64, cache) for graph in graphs]
    assert made[0] != made[1]  # named by the graphs' bytes, not by their (equal) names
    images = np.random.default_rng(0).random((2, 1, 64, 64), dtype=np.float32)
    expected = segment.openvino_backend(made[0], False, ["probability", "presence"])(images).probability
    calls = []
    real = quantize.quantize_int8
    monkeypatch.setattr(quantize, "quantize_int8", lambda *args: calls.append(args) or real(*args))
    bin_file = made[0].with_suffix(".bin")
    bin_file.write_bytes(np.random.default_rng(1).bytes(bin_file.stat().st_size))  # damaged, same size
    assert quantize.cached_int8(graphs[0], calibration, 64, cache) == made[0] and len(calls) == 1
    again = segment.openvino_backend(made[0], False, ["probability", "presence"])(images).probability
    assert np.array_equal(again, expected)
    assert quantize.cached_int8(graphs[0], calibration, 64, cache) == made[0] and len(calls) == 1  # whole: kept

    def disk_full(*args, **kwargs):
        raise RuntimeError("Exception from src/core/src/pass/serialize.cpp:\nbasic_ios::clear: iostream error")

    monkeypatch.setattr(openvino, "save_model", disk_full)
    with pytest.raises(DataError, match=r"^paths.cache_dir='.*': the int8 graph could not be written there"):
        quantize.cached_int8(graphs[1], calibration, 64, tmp_path / "full")
    assert not list((tmp_path / "full" / "graphs").glob("*"))  # nothing half-written is left


@pytest.mark.slow
def test_int8_refuses_a_graph_with_external_data_before_reading_it(trained_checkpoints, tmp_path) -> None:
    import onnx

    graph = export_onnx(load_predictor(str(trained_checkpoints[0]), tmp_path), tmp_path / "export" / "model.onnx")
    onnx.save_model(onnx.load(str(graph)), str(graph), save_as_external_data=True, location="weights.bin",
                    size_threshold=0)  # fmt: skip
    with pytest.raises(ModelFileError, match="keeps weights in other files"):
        segment.load_backend(str(graph), tmp_path, "openvino_int8", NO_OVERRIDES, False, tmp_path, False, str(graph))


@pytest.mark.slow
def test_int8_ranges_travel_in_the_model_file_and_rebuild_the_calibrated_model(
    compose_cfg, trained_checkpoints, tmp_path, monkeypatch, caplog, capsys
) -> None:
    """export format=safetensors int8_calibration=... keeps the calibration as numbers; predict's
    ``auto`` then runs that very int8 model (the same masks as calibrating on the spot), and ranges
    that do not rebuild it are refused, or passed over by ``auto`` with a warning."""
    from covidseg.export import main as export_main
    from covidseg.predict import predict

    monkeypatch.setattr(segment, "cpu_has_int8_dot_products", lambda: True)
    checkpoint = trained_checkpoints[0]
    phantoms = Path(
        compose_cfg("eval", [f"ckpt_path={checkpoint}", *(o for o in FAST if o.startswith("data"))]).data.root
    )
    calibration = f"int8_calibration={phantoms}/Train/*/images/*.png"
    cache = f"paths.cache_dir={tmp_path / 'cache'}"
    for refused, said in (
        (["format=onnx", calibration], "int8 ranges travel in a safetensors model file, not format=onnx"),
        (["format=safetensors", f"{calibration}/none-here"], "names no image files"),
        (["format=safetensors", calibration, "int8_presence_threshold=1"], "expected a number between 0 and 1"),
        (["format=safetensors", calibration, "int8_presence_threshold=abc"], "expected a number between 0 and 1"),
        (["format=safetensors", "int8_presence_threshold=0.3"], "give int8_calibration too"),
    ):
        code = run_command(export_main, f"ckpt_path={checkpoint}", f"output={tmp_path / 'no'}", *refused, cache)
        assert code == 2 and said in capsys.readouterr().err
    gate = "int8_presence_threshold=0.3"  # the int8 model's own gate, as if chosen on Val
    assert run_command(export_main, f"ckpt_path={checkpoint}", "format=safetensors", f"output={tmp_path / 'm'}",
                       calibration, gate, cache) == 0  # fmt: skip
    model = tmp_path / "m" / "model.safetensors"
    loaded = load_predictor(str(model), tmp_path)
    assert loaded.spec.int8 is not None and tuple(loaded.int8_ranges.shape) == (loaded.spec.int8.quantizers, 4)
    assert "X-rays of" in loaded.spec.int8.calibration and loaded.spec.int8.presence_threshold == 0.3
    gates = {
        name: segment.load_backend(
            str(model), tmp_path, name, NO_OVERRIDES, False, tmp_path / "cache"
        ).spec.inference.presence_threshold
        for name in ("auto", "openvino", "torch")
    }
    assert gates == {"auto": 0.3, "openvino": loaded.spec.inference.presence_threshold, "torch": gates["openvino"]}
    assert loaded.predictor.settings.presence_threshold == gates["torch"]  # the int8 gate went to a copy

    def never(*args):
        raise AssertionError("quantized again")

    with monkeypatch.context() as patched:  # the rebuilt int8 model is kept: a second load quantizes nothing
        patched.setattr(quantize, "quantize_int8", never)
        kept = segment.load_backend(str(model), tmp_path, "openvino_int8", NO_OVERRIDES, False, tmp_path / "cache")
    # a kept model edited so that it still reads, its record rewritten to match: not the model the file
    # describes, so it is made again rather than run
    xml = kept.int8_graph.read_text()
    edited = xml.replace('levels="256"', 'levels="255"', 1)
    assert edited != xml
    kept.int8_graph.write_text(edited)
    record = json.loads(kept.int8_graph.with_suffix(".json").read_text())
    record[".xml"] = hashlib.sha256(edited.encode()).hexdigest()
    kept.int8_graph.with_suffix(".json").write_text(json.dumps(record))
    caplog.set_level(logging.WARNING, logger="covidseg.inference.quantize")
    again = segment.load_backend(str(model), tmp_path, "openvino_int8", NO_OVERRIDES, False, tmp_path / "cache")
    assert "is not the one the model file describes: made again" in caplog.text
    assert again.int8_graph == kept.int8_graph and quantize._model_digest(again.int8_graph) == loaded.spec.int8.digest
    # a setting the int8 graph holds, changed: auto runs OpenVINO without int8, openvino_int8 refuses
    flip_changed = NO_OVERRIDES | {"flip_tta": not loaded.spec.inference.flip_tta}
    caplog.set_level(logging.INFO, logger="covidseg.inference.segment")
    assert (
        segment.load_backend(str(model), tmp_path, "auto", flip_changed, False, tmp_path / "cache").int8_graph is None
    )
    assert (
        "openvino_int8 failed, trying openvino: " in caplog.text and "do not fit this command: flip_tta=" in caplog.text
    )
    with pytest.raises(ConfigError, match="its int8 ranges do not fit this command: flip_tta="):
        segment.load_backend(str(model), tmp_path, "openvino_int8", flip_changed, False, tmp_path / "cache")
    assert load_predictor([str(model), str(model)], tmp_path).int8_ranges is None  # an ensemble of files: none
    assert run_command(export_main, f"ckpt_path={model}", f"output={tmp_path / 'graph'}", cache) == 0
    assert json.loads((tmp_path / "graph" / "model.json").read_text())["model"]["int8"] is None  # not in the graph
    assert "int8" not in (tmp_path / "graph" / "MODEL_CARD.md").read_text()

    def masks(output: str, *extra: str) -> dict[str, bytes]:
        overrides = [f"ckpt_path={model}", f"input={phantoms / 'Val' / 'COVID-19' / 'images'}", cache,
                     f"output={tmp_path / output}", "bf16=false", *extra]  # fmt: skip
        predict(compose_cfg("predict", overrides))
        return {path.name: path.read_bytes() for path in sorted((tmp_path / output).glob("*.mask.png"))}

    caplog.clear()
    shipped = masks("auto", "backend=auto")
    assert "backend=auto: openvino int8" in caplog.text
    assert shipped and shipped == masks("calibrated", "backend=openvino_int8", calibration, "presence_threshold=0.3")

    # the ranges as another CPU rebuilds them: the model that rebuild makes is named among rebuilt_digests
    spec_file = model.with_suffix(".yaml")
    measured = spec_file.read_text()
    spec = yaml.safe_load(measured)
    spec["int8"] |= {"digest": "f" * 64, "rebuilt_digests": ["e" * 64, spec["int8"]["digest"]]}
    spec_file.write_text(yaml.safe_dump(spec))
    caplog.clear()
    assert masks("rebuilt_elsewhere", "backend=auto") == shipped and "backend=auto: openvino int8" in caplog.text
    spec_file.write_text(measured)

    state = safetensors.torch.load_file(model)  # one range moved: no longer the model that was measured
    state["int8.ranges"][0, 1] *= 1.5
    safetensors.torch.save_file(state, model)
    caplog.clear()
    assert masks("fallback", "backend=auto")  # answered, by OpenVINO without int8
    assert "openvino_int8 failed, trying openvino: " in caplog.text and "key 'int8.digest' is" in caplog.text
    with monkeypatch.context() as patched:  # found wanting once: not quantized again on the next run
        patched.setattr(quantize, "quantize_int8", never)
        caplog.clear()
        assert masks("fallback_again", "backend=auto") and "key 'int8.digest' is" in caplog.text
    with monkeypatch.context() as patched:  # another kind of CPU sharing the cache tries for itself
        tried, quantize_here = [], quantize.quantize_int8
        patched.setattr(quantize, "cpu_identity", lambda: "another CPU")
        patched.setattr(quantize, "quantize_int8", lambda *args: tried.append(args) or quantize_here(*args))
        assert masks("fallback_elsewhere", "backend=auto") and len(tried) == 1
    code = run_command(predict_main, f"ckpt_path={model}", f"input={phantoms / 'Val'}", f"output={tmp_path / 'x'}",
                       "backend=openvino_int8", cache)  # fmt: skip
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1 and f"{str(model)!r}: key 'int8.digest' is" in error[0]
    assert re.search(r"its ranges make [0-9a-f]{64} on this CPU", error[0])  # the digest, whole


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda state, spec: state.pop("int8.ranges"), "tensor 'int8.ranges' is missing"),
        (lambda state, spec: state.update({"int8.ranges": torch.zeros(3, 4)}), r"of shape \(3, 4\); .* needs \(5, 4\)"),
        (lambda state, spec: state["int8.ranges"].fill_(float("nan")), "'int8.ranges' holds NaN or infinite values"),
        (lambda state, spec: state["int8.ranges"][2].copy_(torch.tensor([1.0, -1, 0, 1])), r"row 2 is \[1.0, -1.0"),
        (lambda state, spec: state["int8.ranges"][4].fill_(1e30), "each low below its high, within"),
        (lambda state, spec: spec.pop("int8"), "tensor 'int8.ranges' belongs to no network"),
        (lambda state, spec: spec["int8"].update(digest="x"), "digest"),
        (lambda state, spec: spec["int8"].update(rebuilt_digests=["0" * 63]), "rebuilt_digests"),
        (lambda state, spec: spec["int8"].update(rebuilt_digests=["1" * 64] * 9), "rebuilt_digests"),
        (lambda state, spec: spec["int8"].update(rebuilt_digests=["1" * 64] * 2), "each digest once"),
        (lambda state, spec: spec["int8"].update(rebuilt_digests=[spec["int8"]["digest"]]), "each digest once"),
        (
            lambda state, spec: state.update({"int8.ranges.extra": torch.zeros(2, 2)}),
            "'int8.ranges.extra' belongs to no",
        ),
        (lambda state, spec: state.update({"int8.ranges": state["int8.ranges"].int()}), "holds torch.int32 values"),
        (lambda state, spec: spec["int8"].update(calibration="\x1b[31mred\rX"), "calibration"),
    ],
)
def test_int8_ranges_a_model_file_cannot_back_are_refused(change, message, trained_checkpoints, tmp_path) -> None:
    from covidseg.inference.exporters import export_safetensors

    loaded = load_predictor(str(trained_checkpoints[0]), tmp_path)
    int8 = Int8Spec(quantizers=5, digest="0" * 64, calibration="test")
    loaded = dataclasses.replace(
        loaded,
        spec=loaded.spec.model_copy(update={"int8": int8}),
        int8_ranges=torch.tensor([[-1.0, 1, -1, 1]]).repeat(5, 1),
    )
    path = export_safetensors(loaded, tmp_path / "model.safetensors")
    state, spec = safetensors.torch.load_file(path), yaml.safe_load(path.with_suffix(".yaml").read_text())
    change(state, spec)
    safetensors.torch.save_file(state, path)
    path.with_suffix(".yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ModelFileError, match=message):
        load_predictor(str(path), tmp_path)


def test_a_cache_entry_that_is_a_fifo_is_made_again_not_waited_on(tmp_path: Path) -> None:
    path = tmp_path / "graphs" / "entry.int8.xml"
    path.parent.mkdir()
    for suffix in (".xml", ".bin"):
        path.with_suffix(suffix).write_bytes(b"x")
    os.mkfifo(path.with_suffix(".json"))  # no writer: reading it as a plain file would block for good
    assert not quantize._kept(path)
