"""The x-ray check: its statistics, the command that fits it, the model file that carries it, and
predict, serve and every backend refusing a picture unlike the model's X-rays."""

from __future__ import annotations

import csv
import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from covidseg.core.errors import ConfigError, ModelFileError
from covidseg.evaluation.not_xrays import generated_pictures, packaged_pictures
from covidseg.inference.loader import load_predictor
from covidseg.inference.segment import load_backend
from covidseg.inference.xray_check import fit_xray_check
from tests.conftest import FAST

NO_OVERRIDES: dict = {}


def test_the_score_is_the_residual_outside_the_reference_components() -> None:
    generator = torch.Generator().manual_seed(0)
    directions = torch.linalg.qr(torch.randn(20, 3, generator=generator))[0].T  # a 3-D subspace of R^20
    reference = torch.randn(500, 3, generator=generator) @ directions * 5 + 2
    check = fit_xray_check(reference + 0.01 * torch.randn(500, 20, generator=generator), components=3)
    inside = torch.randn(50, 3, generator=generator) @ directions * 5 + 2
    outside = inside + 2 * torch.randn(50, 20, generator=generator)  # off the subspace
    assert check(inside).max() < 0.1 < 1.0 < check(outside).min()
    with pytest.raises(ValueError, match="components=20"):
        fit_xray_check(reference, components=20)


def test_the_pictures_are_gray_and_each_is_counted_once() -> None:
    """Every install measures real photographs and a real MRI slice (Matplotlib's, a dependency); no
    picture appears twice under two names (scikit-image's ``cat`` is its ``chelsea``)."""
    pictures = generated_pictures() | packaged_pictures()
    assert {"matplotlib_grace_hopper", "matplotlib_head_mri", "matplotlib_logo", "matplotlib_present"} <= set(pictures)
    assert all(picture.dtype == np.uint8 and picture.ndim == 2 and picture.std() > 5 for picture in pictures.values())
    digests = {name: hash((picture.shape, picture.tobytes())) for name, picture in pictures.items()}
    assert len(set(digests.values())) == len(digests), "a picture counted twice"


@pytest.fixture(scope="module")
def checked_model(trained_checkpoints: list[Path], tmp_path_factory: pytest.TempPathFactory, cache_dir: Path):
    """A tiny phantom model with its check, fitted by the command as a user runs it."""
    from covidseg.fit_xray_check import fit
    from tests.conftest import compose_config

    out = tmp_path_factory.mktemp("fit")
    data = [override for override in FAST if override.startswith("data")]
    cfg = compose_config(
        "fit_xray_check",
        [*data, f"ckpt_path={trained_checkpoints[0]}", "components=4"],
        log_dir=out,
        output_dir=out / "run",
        cache_dir=cache_dir,
    )
    return fit(cfg), out / "run"


def test_the_command_fits_on_train_measures_val_and_pictures_and_writes_the_model(checked_model) -> None:
    result, run = checked_model
    assert json.loads((run / "xray_check.json").read_text())["threshold"] == result["threshold"]
    spec = yaml.safe_load((run / "model.yaml").read_text())
    assert spec["xray_check"]["components"] == 4 and spec["xray_check"]["threshold"] == result["threshold"]
    held_out = sum(row["images"] for row in result["held_out_train"].values())
    assert result["reference_images"] + held_out == 3 * 8  # every Train phantom fits or chooses
    assert set(result["val"]) == {"COVID-19", "Non-COVID", "Normal"}
    assert set(result["not_xray_scores"]) == set(generated_pictures()) | set(packaged_pictures())
    drawn = {name: score for name, score in result["not_xray_scores"].items() if name in generated_pictures()}
    assert sum(score > result["threshold"] for score in drawn.values()) >= 0.9 * len(drawn)
    # the file scores as the command measured (the check stored in fp16, as fitted)
    loaded = load_predictor(str(run / "model.safetensors"), run)
    document = cv2.resize(generated_pictures()["document"], (64, 64), interpolation=cv2.INTER_AREA)
    score = loaded.predictor.predict(torch.from_numpy(document[None, None] / 255).float()).xray_score
    assert score.item() == pytest.approx(result["not_xray_scores"]["document"], rel=0.05)


def _pictures(folder: Path, xray: np.ndarray) -> Path:
    folder.mkdir()
    cv2.imwrite(str(folder / "chest.png"), xray)
    for name in ("document", "uniform_noise", "checkerboard"):
        cv2.imwrite(str(folder / f"{name}.png"), generated_pictures()[name])
    return folder


def test_predict_refuses_what_is_not_an_xray_lists_it_and_exits_3(checked_model, compose_cfg, xray, tmp_path) -> None:
    _, run = checked_model
    pictures = _pictures(tmp_path / "in", xray)
    model = f"ckpt_path={run / 'model.safetensors'}"
    command = [sys.executable, "-m", "covidseg.predict", model, f"input={pictures}", f"output={tmp_path / 'out'}"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, done.stderr[-2000:]
    said = done.stdout + done.stderr  # the warnings go to the log on stdout
    assert "does not look like a chest X-ray" in said and "Traceback" not in said
    with (tmp_path / "out" / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    refused = {"document.png", "uniform_noise.png", "checkerboard.png"} - {Path(row["file"]).name for row in rows}
    assert len(refused) >= 2  # the tiny model's check refuses most of them (it measures 90 % or more)
    assert not any((tmp_path / "out" / f"{name}.mask.png").exists() for name in refused)  # no mask for them
    assert all(float(row["xray_score"]) >= 0 for row in rows)
    # the user's override answers every picture
    cfg = compose_cfg("predict", [model, f"input={pictures}", f"output={tmp_path / 'all'}", "xray_check=false"])
    from covidseg.predict import predict

    answered = predict(cfg)
    assert len(answered.rows) == 4 and answered.refused == []
    with pytest.raises(ConfigError, match="xray_check='maybe'"):
        predict(compose_cfg("predict", [model, f"input={pictures}", f"output={tmp_path / 'x'}", "xray_check=maybe"]))


@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_every_backend_scores_as_torch_does(checked_model, backend: str, tmp_path: Path) -> None:
    _, run = checked_model
    model = str(run / "model.safetensors")
    images = np.stack([cv2.resize(picture, (64, 64), interpolation=cv2.INTER_AREA) for picture in
                       generated_pictures().values()])[:, None].astype(np.float32) / 255  # fmt: skip
    torch_scores = load_backend(model, run, "torch", NO_OVERRIDES, False, tmp_path).run(images).xray_score
    graph_scores = load_backend(model, run, backend, NO_OVERRIDES, False, tmp_path).run(images).xray_score
    np.testing.assert_allclose(graph_scores, torch_scores, rtol=1e-3, atol=1e-3)


def test_serve_answers_a_refused_picture_422_with_its_score(checked_model, xray) -> None:
    from fastapi.testclient import TestClient

    from covidseg.serving.app import ServeSettings, create_app

    _, run = checked_model
    model = load_backend(str(run / "model.safetensors"), run, "torch", NO_OVERRIDES, False, run).checking(True)
    client = TestClient(create_app(model, ServeSettings()))
    _, noise = cv2.imencode(".png", generated_pictures()["checkerboard"])
    response = client.post("/api/predict", files={"file": ("board.png", noise.tobytes(), "image/png")})
    answer = response.json()
    assert response.status_code == 422 and answer["refused"] is True
    assert answer["xray_score"] > answer["xray_threshold"] == model.refuse_above
    assert "does not look like a chest X-ray" in answer["error"] and "mask_png" not in answer
    _, chest = cv2.imencode(".png", xray)
    allowed = load_backend(str(run / "model.safetensors"), run, "torch", NO_OVERRIDES, False, run).checking(False)
    response = TestClient(create_app(allowed, ServeSettings())).post(
        "/api/predict", files={"file": ("board.png", noise.tobytes(), "image/png")}
    )
    assert response.status_code == 200 and response.json()["xray_score"] > model.refuse_above


def _copy_model(run: Path, folder: Path) -> Path:
    folder.mkdir()
    for suffix in (".safetensors", ".yaml"):
        (folder / f"model{suffix}").write_bytes((run / f"model{suffix}").read_bytes())
    return folder / "model.safetensors"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("wrong_shape", r"tensor 'xray_check.basis' is of shape \(2, 124\); .* needs shape \(4, 124\)"),
        ("missing_tensor", "tensor 'xray_check.scale' is missing"),
        ("nan", "NaN or infinite"),
        ("zero_scale", "tensor 'xray_check.scale' holds values below 1e-6"),
        ("tiny_scale", "tensor 'xray_check.scale' holds values below 1e-6"),
        ("not_orthonormal", "tensor 'xray_check.basis' is not a set of orthonormal directions"),
        ("huge_declared", "tensor 'xray_check.mean' is of shape \\(124,\\); .* needs shape \\(10000,\\)"),
        ("no_spec", "belongs to no network"),
        ("feature_count", "the first network's encoder gives"),
        ("too_many_components", "must be fewer than feature_count"),
        ("infinite_threshold", "xray_check.threshold"),
    ],
)
def test_a_damaged_or_forged_check_is_refused_naming_the_file(checked_model, tmp_path, change, message) -> None:
    _, run = checked_model
    path = _copy_model(run, tmp_path / "model")
    tensors, spec = load_file(path), yaml.safe_load(path.with_suffix(".yaml").read_text())
    check = spec["xray_check"]
    if change == "wrong_shape":
        tensors["xray_check.basis"] = tensors["xray_check.basis"][:2].contiguous()
    elif change == "missing_tensor":
        del tensors["xray_check.scale"]
    elif change == "nan":
        tensors["xray_check.mean"][0] = float("nan")
    elif change == "zero_scale":
        tensors["xray_check.scale"][3] = 0
    elif change == "tiny_scale":  # finite, but every score would be infinite
        tensors["xray_check.scale"][3] = 1e-30
    elif change == "not_orthonormal":  # scaled directions: every score near 0, the check silently off
        tensors["xray_check.basis"] = tensors["xray_check.basis"] * 100
    elif change == "huge_declared":  # a spec that asks the loader for 40 MB the file does not hold
        check["feature_count"], check["components"] = 10_000, 1_000
    elif change == "no_spec":
        del spec["xray_check"]
    elif change == "feature_count":  # spec and tensors agree with each other, not with the network
        check["feature_count"] -= 1
        for name in ("mean", "scale"):
            tensors[f"xray_check.{name}"] = tensors[f"xray_check.{name}"][:-1].contiguous()
        tensors["xray_check.basis"] = torch.eye(check["feature_count"])[: check["components"]].half()
    elif change == "too_many_components":
        check["components"] = check["feature_count"]
    elif change == "infinite_threshold":
        check["threshold"] = float("inf")
    save_file(tensors, path)
    path.with_suffix(".yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ModelFileError, match=message) as refused:
        load_predictor(str(path), tmp_path)
    assert str(path.parent) in str(refused.value)


def test_eval_reports_the_share_of_xrays_the_check_would_refuse(checked_model, compose_cfg) -> None:
    from covidseg.eval import evaluate

    result, run = checked_model
    data = [override for override in FAST if override.startswith("data")]
    model = f"ckpt_path={run / 'model.safetensors'}"
    cfg = compose_cfg("eval", [*data, model, "data.split=Val", "stats.resamples=100"])
    metrics = evaluate(cfg)
    with (Path(cfg.paths.output_dir) / "per_image.csv").open() as handle:
        scores = [float(row["xray_score"]) for row in csv.DictReader(handle)]
    refused = sum(score > result["threshold"] for score in scores)
    assert metrics["test/xray_refused_images"] == refused and metrics["test/xray_refused"] == refused / len(scores)
    # the command measured the same Val X-rays of the evaluated class with the same reference
    assert refused == result["val"]["COVID-19"]["refused"]


def test_loading_the_check_leaves_the_networks_weights_and_statistics_as_stored(checked_model) -> None:
    _, run = checked_model
    stored = load_file(run / "model.safetensors")
    loaded = load_predictor(str(run / "model.safetensors"), run).predictor.state_dict()
    for name, tensor in stored.items():
        torch.testing.assert_close(loaded[name].half(), tensor, msg=name)


def _export_onnx(model: str, folder: Path) -> Path:
    from covidseg.inference.exporters import export_onnx

    return export_onnx(load_predictor(model, folder), folder / "model.onnx")


@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_an_onnx_graph_must_answer_what_its_json_says(checked_model, trained_checkpoints, backend, tmp_path) -> None:
    import onnx

    _, run = checked_model
    checked = _export_onnx(str(run / "model.safetensors"), tmp_path / "checked")
    plain = _export_onnx(str(trained_checkpoints[0]), tmp_path / "plain")
    # a graph without the check beside a .json that declares it: it would refuse nothing
    (plain.parent / "model.json").write_text((checked.parent / "model.json").read_text())
    with pytest.raises(ModelFileError, match=r"outputs are \['probability', 'presence'\], but its model spec expects"):
        load_backend(str(plain), tmp_path, backend, NO_OVERRIDES, False, tmp_path)
    # the .json's own list of outputs disagrees with its spec
    metadata = json.loads((checked.parent / "model.json").read_text())
    metadata["outputs"] = ["probability", "presence"]
    (checked.parent / "model.json").write_text(json.dumps(metadata))
    with pytest.raises(ModelFileError, match="model.json': key 'outputs'"):
        load_backend(str(checked), tmp_path, backend, NO_OVERRIDES, False, tmp_path)
    # outputs renamed in the graph (it still passes onnx.checker)
    metadata["outputs"] = ["probability", "presence", "xray_score"]
    (checked.parent / "model.json").write_text(json.dumps(metadata))
    graph = onnx.load(str(checked))
    renames = {output.name: f"out{index}" for index, output in enumerate(graph.graph.output)}
    for node in graph.graph.node:
        node.output[:] = [renames.get(name, name) for name in node.output]
    for output in graph.graph.output:
        output.name = renames[output.name]
    onnx.checker.check_model(graph)
    onnx.save(graph, str(checked))
    with pytest.raises(ModelFileError, match=r"outputs are \[.*'out1', 'out2'\], but its model spec expects"):
        load_backend(str(checked), tmp_path, backend, NO_OVERRIDES, False, tmp_path)


def test_an_ensembles_check_is_its_first_models_and_every_members_is_validated(
    checked_model, trained_checkpoints, tmp_path, caplog
) -> None:
    _, run = checked_model
    checked = str(run / "model.safetensors")
    with caplog.at_level("INFO", logger="covidseg.inference.loader"):
        assert load_predictor([str(trained_checkpoints[1]), checked], tmp_path).predictor.xray_check is None
    assert "x-ray check is its first model's" in caplog.text
    assert load_predictor([checked, str(trained_checkpoints[1])], tmp_path).predictor.xray_check is not None
    broken = _copy_model(run, tmp_path / "broken")
    tensors = load_file(broken)
    del tensors["xray_check.mean"]
    save_file(tensors, broken)
    with pytest.raises(ModelFileError, match="broken/model.safetensors': tensor 'xray_check.mean' is missing"):
        load_predictor([checked, str(broken)], tmp_path)


def test_bf16_scores_of_the_shipped_model_stay_near_fp32(xray, tmp_path) -> None:
    pictures = [xray, *(generated_pictures()[name] for name in ("document", "scene", "head_slice", "cloudy_noise"))]
    images = np.stack([cv2.resize(picture, (256, 256), interpolation=cv2.INTER_AREA) for picture in pictures])
    images = images[:, None].astype(np.float32) / 255
    fp32 = load_backend("pretrained", tmp_path, "torch", NO_OVERRIDES, False, tmp_path).run(images).xray_score
    for backend in ("torch", "openvino"):
        bf16 = load_backend("pretrained", tmp_path, backend, NO_OVERRIDES, True, tmp_path).run(images).xray_score
        np.testing.assert_allclose(bf16, fp32, rtol=0.1)  # bf16's rounding, not another answer


def test_an_infinite_score_is_refused_in_json_the_client_can_read(checked_model, xray) -> None:
    from fastapi.testclient import TestClient

    from covidseg.inference.predictor import Answer
    from covidseg.serving.app import ServeSettings, create_app

    _, run = checked_model
    model = load_backend(str(run / "model.safetensors"), run, "torch", NO_OVERRIDES, False, run).checking(True)
    real = model.run
    model.run = lambda images: Answer(real(images).probability, real(images).presence, np.full(len(images), np.inf))
    _, chest = cv2.imencode(".png", xray)
    response = TestClient(create_app(model, ServeSettings())).post(
        "/api/predict", files={"file": ("chest.png", chest.tobytes(), "image/png")}
    )
    assert response.status_code == 422 and response.json()["refused"] is True and response.json()["xray_score"] is None


@pytest.mark.parametrize(
    "damage",
    [
        lambda folder: (folder / "s1045.ima.gz").unlink(),
        lambda folder: (folder / "s1045.ima.gz").write_bytes(b"\x1f\x8b garbage"),
        lambda folder: (folder / "s1045.ima.gz").write_bytes(gzip.compress(b"\x00" * 1000)),  # too short
        lambda folder: (folder / "grace_hopper.jpg").write_bytes(b"not a picture"),
    ],
)
def test_a_missing_or_damaged_sample_picture_is_left_out_with_a_warning(damage, tmp_path, monkeypatch, caplog):
    import matplotlib

    data = tmp_path / "mpl-data"
    shutil.copytree(Path(matplotlib.get_data_path()) / "sample_data", data / "sample_data")
    damage(data / "sample_data")
    monkeypatch.setattr(matplotlib, "get_data_path", lambda: str(data))
    with caplog.at_level("WARNING", logger="covidseg.evaluation.not_xrays"):
        pictures = packaged_pictures()
    assert len([name for name in pictures if name.startswith("matplotlib_")]) == 3
    assert "left out Matplotlib's sample picture" in caplog.text
