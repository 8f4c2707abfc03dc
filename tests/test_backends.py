"""Inference backends: what ``backend=auto`` picks, and what it does when its pick cannot run."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST

from covidseg.core.errors import ConfigError
from covidseg.core.run_files import add_to_run_info
from covidseg.inference import segment
from covidseg.inference.loader import INFERENCE_KEYS, load_predictor

NO_OVERRIDES = dict.fromkeys(INFERENCE_KEYS)


def test_auto_tries_int8_where_the_model_and_the_cpu_allow_then_openvino_then_torch(monkeypatch) -> None:
    monkeypatch.setattr(segment, "cpu_has_int8_dot_products", lambda: True)
    assert segment.backends_to_try("auto", has_int8_ranges=True) == ["openvino_int8", "openvino", "torch"]
    assert segment.backends_to_try("auto", has_int8_ranges=False) == ["openvino", "torch"]
    assert segment.backends_to_try("onnx", has_int8_ranges=True) == ["onnx"]  # a named backend is taken as named
    monkeypatch.setattr(segment, "cpu_has_int8_dot_products", lambda: False)  # no VNNI or AMX: int8 does not pay
    assert segment.backends_to_try("auto", has_int8_ranges=True) == ["openvino", "torch"]
    monkeypatch.setattr(segment.importlib.util, "find_spec", lambda name: None)
    assert segment.backends_to_try("auto", has_int8_ranges=True) == ["torch"]
    with pytest.raises(ConfigError, match="backend='tensorrt': expected one of auto, torch, onnx, openvino"):
        segment.backends_to_try("tensorrt", has_int8_ranges=False)


def test_auto_falls_back_to_torch_when_openvino_cannot_run_the_model(
    trained_checkpoints: list[Path], tmp_path: Path, monkeypatch, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="covidseg.inference.segment")

    def cannot_compile(*args):
        raise RuntimeError("Unsupported operation: NewOp-42")

    monkeypatch.setattr(segment, "graph_backend", cannot_compile)
    checkpoint = str(trained_checkpoints[0])
    loaded = segment.load_backend(checkpoint, tmp_path, "auto", NO_OVERRIDES, False, tmp_path / "cache")
    assert "backend=auto: openvino failed, trying torch: Unsupported operation: NewOp-42" in caplog.text
    assert "backend=auto: torch" in caplog.text.splitlines()[-1]
    images = np.random.default_rng(0).random((2, 1, 64, 64), dtype=np.float32)
    expected = load_predictor(checkpoint, tmp_path).predictor.predict(torch.from_numpy(images))
    probability = loaded.run(images).probability
    assert np.allclose(probability, expected.probability.numpy(), atol=1e-6)
    with pytest.raises(RuntimeError, match="NewOp-42"):  # named, it is not replaced behind the user's back
        segment.load_backend(checkpoint, tmp_path, "openvino", NO_OVERRIDES, False, tmp_path / "cache")


def test_eval_falls_back_like_predict_and_records_the_backend_that_ran(
    compose_cfg, trained_checkpoints: list[Path], monkeypatch, caplog
) -> None:
    from covidseg.eval import evaluate

    def cannot_compile(*args):
        raise RuntimeError("Unsupported operation: NewOp-42")

    caplog.set_level(logging.INFO, logger="covidseg.inference.segment")
    data = [o for o in FAST if o.startswith("data")]
    overrides = [f"ckpt_path={trained_checkpoints[0]}", *data, "trainer.limit_test_batches=1"]
    monkeypatch.setattr(segment, "graph_backend", cannot_compile)
    unused = "int8_calibration=/nowhere/*.png"  # read by openvino_int8 only: said once, never tried
    fallen_back = evaluate(compose_cfg("eval", [*overrides, "backend=auto", "bf16=true", unused]))
    assert "backend=auto: openvino failed, trying torch: Unsupported operation: NewOp-42" in caplog.text
    assert "int8_calibration is read by backend=openvino_int8 only; backend=auto runs without it" in caplog.text
    assert "names no image files" not in caplog.text
    output_dir = Path(compose_cfg("eval", []).paths.output_dir)
    ran = json.loads((output_dir / "run_info.json").read_text())
    assert ran["backend"] == "torch" and ran["bf16"] is True and ran["command"]
    assert "(openvino)" not in (output_dir / "report.html").read_text()
    # run_info.json replaced while eval ran (a FIFO here): written again from memory, never read back
    os.remove(output_dir / "run_info.json")
    os.mkfifo(output_dir / "run_info.json")
    add_to_run_info(output_dir, ran, {"backend": "torch"})
    assert json.loads((output_dir / "run_info.json").read_text()) == ran
    monkeypatch.undo()
    torch_bf16 = evaluate(compose_cfg("eval", [*overrides, "backend=torch", "bf16=true"]))
    assert fallen_back["test/dice"] == torch_bf16["test/dice"]  # the same backend, the same answer


def test_a_graph_exported_from_a_bf16_predictor_is_fp32_and_cached_once(
    trained_checkpoints: list[Path], tmp_path: Path
) -> None:
    from covidseg.inference.exporters import cached_onnx

    checkpoint = str(trained_checkpoints[0])
    from_bf16 = cached_onnx(load_predictor(checkpoint, tmp_path, bf16=True), tmp_path / "cache")
    assert cached_onnx(load_predictor(checkpoint, tmp_path, bf16=False), tmp_path / "cache") == from_bf16
    images = np.random.default_rng(0).random((2, 1, 64, 64), dtype=np.float32)
    probability = segment.onnx_backend(from_bf16, ["probability", "presence"])(
        images
    ).probability  # ONNX Runtime refuses bf16 casts on CPU
    expected = load_predictor(checkpoint, tmp_path).predictor.predict(torch.from_numpy(images)).probability
    assert np.abs(probability - expected.numpy()).max() <= 1e-4
