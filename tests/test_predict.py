import csv
import json
from pathlib import Path

import cv2
import numpy as np
import onnxruntime
import pytest
import torch
import yaml
from conftest import FAST

from covidseg.core.errors import DataError, ModelFileError
from covidseg.inference.exporters import export_onnx, export_safetensors, export_torchscript
from covidseg.inference.loader import load_predictor
from covidseg.predict import predict

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoint(trained_checkpoints: list[Path]) -> Path:
    return trained_checkpoints[0]


@pytest.fixture
def xrays(tmp_path: Path) -> Path:
    """Images of odd sizes and formats, and one corrupt file."""
    folder = tmp_path / "xrays"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    cv2.imwrite(str(folder / "gray.png"), rng.integers(0, 255, (300, 250), dtype=np.uint8))
    grey_in_rgb = cv2.cvtColor(rng.integers(0, 255, (97, 131), dtype=np.uint8), cv2.COLOR_GRAY2BGR)
    cv2.imwrite(str(folder / "rgb.jpg"), grey_in_rgb)  # an X-ray saved as RGB (a colour picture is refused)
    cv2.imwrite(str(folder / "sub" / "deep.tif"), rng.integers(0, 65535, (64, 80), dtype=np.uint16))
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    return folder


def _predict(compose_cfg, checkpoint: Path, xrays: Path, output: Path, *extra: str) -> list[dict]:
    cfg = compose_cfg("predict", [f"ckpt_path={checkpoint}", f"input={xrays}", f"output={output}", *extra])
    with predict(cfg).csv_path.open() as handle:
        return list(csv.DictReader(handle))


def test_predict_writes_masks_at_input_size_overlays_and_csv(compose_cfg, checkpoint, xrays, tmp_path) -> None:
    rows = _predict(compose_cfg, checkpoint, xrays, tmp_path / "out", "save_probability=true")
    assert sorted(Path(row["file"]).name for row in rows) == ["deep.tif", "gray.png", "rgb.jpg"]
    for row in rows:
        source = Path(row["file"])
        stem = tmp_path / "out" / source.relative_to(xrays)
        mask = cv2.imread(str(stem) + ".mask.png", cv2.IMREAD_UNCHANGED)
        original = cv2.imread(str(source), cv2.IMREAD_UNCHANGED)
        assert mask.shape == original.shape[:2] and set(np.unique(mask)) <= {0, 255}
        assert cv2.imread(str(stem) + ".overlay.png").shape == (*original.shape[:2], 3)
        assert Path(str(stem) + ".probability.png").is_file()
        assert int(row["infected_pixels"]) == int((mask > 0).sum())
        assert float(row["infected_percent"]) == pytest.approx(100 * (mask > 0).mean(), abs=1e-3)


def test_predict_refuses_output_inside_the_input_folder(compose_cfg, checkpoint, xrays) -> None:
    with pytest.raises(DataError, match="inside the input folder"):
        _predict(compose_cfg, checkpoint, xrays, xrays / "out")
    assert sorted(p.name for p in xrays.iterdir()) == ["broken.png", "gray.png", "rgb.jpg", "sub"]


def test_predict_accepts_a_glob_and_a_single_file(compose_cfg, checkpoint, xrays, tmp_path) -> None:
    assert len(_predict(compose_cfg, checkpoint, f"{xrays}/*.png", tmp_path / "a")) == 1
    assert len(_predict(compose_cfg, checkpoint, xrays / "rgb.jpg", tmp_path / "b")) == 1


def test_onnx_export_matches_pytorch_and_predicts_the_same_masks(compose_cfg, checkpoint, xrays, tmp_path) -> None:
    loaded = load_predictor(str(checkpoint), tmp_path)
    path = export_onnx(loaded, tmp_path / "export" / "model.onnx")
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["model"]["image_size"] == 64 and meta["model"]["targets"] == ["infection"]
    assert meta["outputs"] == ["probability", "presence"]
    batch = torch.rand(5, 1, 64, 64)  # a batch size other than the exported example's
    session = onnxruntime.InferenceSession(str(path))
    onnx_probability = session.run(None, {"image": batch.numpy()})[0]
    torch_probability = loaded.predictor.predict(batch).probability.numpy()
    assert np.abs(onnx_probability - torch_probability).max() <= 1e-4

    torch_rows = _predict(compose_cfg, checkpoint, xrays, tmp_path / "torch")
    onnx_rows = _predict(compose_cfg, path, xrays, tmp_path / "onnx")
    assert [row["infected_pixels"] for row in torch_rows] == [row["infected_pixels"] for row in onnx_rows]
    for row in torch_rows:
        name = Path(row["file"]).relative_to(xrays)
        torch_mask = cv2.imread(str(tmp_path / "torch" / name) + ".mask.png", 0)
        onnx_mask = cv2.imread(str(tmp_path / "onnx" / name) + ".mask.png", 0)
        assert np.array_equal(torch_mask, onnx_mask)
    with pytest.raises(ModelFileError, match="presence_threshold cannot change an exported .onnx graph"):
        _predict(compose_cfg, path, xrays, tmp_path / "gated", "presence_threshold=0.5")
    higher = _predict(compose_cfg, path, xrays, tmp_path / "higher", "threshold=0.9")  # read from the probabilities
    assert all(int(h["infected_pixels"]) <= int(t["infected_pixels"]) for h, t in zip(higher, torch_rows, strict=True))
    # small regions are dropped from the answer, not inside the graph: the same as the torch Predictor
    onnx_kept = _predict(compose_cfg, path, xrays, tmp_path / "onnx_kept", "min_region_share=0.02")
    torch_kept = _predict(compose_cfg, checkpoint, xrays, tmp_path / "torch_kept", "min_region_share=0.02")
    assert [row["infected_pixels"] for row in onnx_kept] == [row["infected_pixels"] for row in torch_kept]
    pairs = zip(onnx_kept, torch_rows, strict=True)
    assert all(int(kept["infected_pixels"]) <= int(row["infected_pixels"]) for kept, row in pairs)


def test_openvino_runs_the_same_model_as_torch_in_predict_and_eval(compose_cfg, checkpoint, xrays, tmp_path) -> None:
    from covidseg.eval import evaluate

    torch_rows = _predict(compose_cfg, checkpoint, xrays, tmp_path / "torch", "bf16=false")
    openvino_rows = _predict(compose_cfg, checkpoint, xrays, tmp_path / "openvino", "backend=openvino", "bf16=false")
    assert [row["file"] for row in openvino_rows] == [row["file"] for row in torch_rows]
    for row in torch_rows:
        name = Path(row["file"]).relative_to(xrays)
        torch_mask = cv2.imread(str(tmp_path / "torch" / name) + ".mask.png", 0) > 0
        openvino_mask = cv2.imread(str(tmp_path / "openvino" / name) + ".mask.png", 0) > 0
        assert (torch_mask != openvino_mask).mean() <= 0.001, name  # fp32 in both: a pixel at the threshold at most
    data = [o for o in FAST if o.startswith("data")]
    scores, graphs = {}, {}
    for backend in ("torch", "openvino", "onnx"):
        cfg = compose_cfg("eval", [f"ckpt_path={checkpoint}", *data, f"backend={backend}"])
        scores[backend] = evaluate(cfg)
        graphs[backend] = {path: path.stat().st_mtime_ns for path in (Path(cfg.paths.cache_dir) / "graphs").glob("*")}
    assert graphs["onnx"] == graphs["openvino"]  # predict's graph of this model, exported once and reused
    for backend in ("openvino", "onnx"):
        assert scores[backend]["test/dice"] == pytest.approx(scores["torch"]["test/dice"], abs=1e-3), backend


def test_torchscript_export_matches_pytorch(checkpoint, tmp_path) -> None:
    loaded = load_predictor(str(checkpoint), tmp_path)
    path = export_torchscript(loaded, tmp_path / "model.pt")
    batch = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        probability, presence = torch.jit.load(str(path))(batch)
    expected = loaded.predictor.predict(batch)
    torch.testing.assert_close(probability, expected.probability, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(presence, expected.presence, atol=1e-5, rtol=1e-4)


def test_safetensors_export_loads_without_pickle_and_predicts_alike(checkpoint, tmp_path) -> None:
    loaded = load_predictor(str(checkpoint), tmp_path, threshold=0.4)
    path = export_safetensors(loaded, tmp_path / "model.safetensors")
    shipped = load_predictor(str(path), tmp_path)
    assert shipped.spec == loaded.spec and shipped.predictor.threshold == 0.4
    batch = torch.rand(2, 1, 64, 64)
    torch.testing.assert_close(  # fp16 weights
        shipped.predictor.predict(batch).probability, loaded.predictor.predict(batch).probability, atol=0.02, rtol=0.01
    )
    assert load_predictor(str(tmp_path), tmp_path).paths == [path]  # the export folder names it too


def test_shipped_model_predicts_out_of_the_box(compose_cfg, xrays, tmp_path) -> None:
    from covidseg.inference.loader import PRETRAINED

    assert PRETRAINED.stat().st_size <= 20 * 2**20
    spec = load_predictor("pretrained", tmp_path).spec
    assert spec.metrics["dice"] > 0.7 and spec.image_size == 256
    # the thresholds it runs with are the ones its recorded metrics were measured at
    assert spec.inference.threshold == spec.metrics["threshold"]
    assert spec.inference.presence_threshold == spec.metrics["presence_threshold"]
    # phantoms are not chest X-rays: the shipped model's check refuses them, and answers them when told to
    refused = predict(compose_cfg("predict", ["ckpt_path=pretrained", f"input={xrays}", f"output={tmp_path / 'no'}"]))
    assert refused.rows == [] and len(refused.refused) == 3
    rows = _predict(compose_cfg, "pretrained", xrays, tmp_path / "out", "xray_check=false")
    assert sorted(Path(row["file"]).name for row in rows) == ["deep.tif", "gray.png", "rgb.jpg"]
    assert all(0 <= float(row["presence_probability"]) <= 1 for row in rows)
    assert all(float(row["xray_score"]) > spec.xray_check.threshold for row in rows)


def test_the_shipped_lung_model_grades_severity_by_name(compose_cfg, xray, tmp_path) -> None:
    from covidseg.inference.loader import PRETRAINED_MODELS

    spec = load_predictor("pretrained:lung_infection", tmp_path).spec
    assert PRETRAINED_MODELS["pretrained:lung_infection"].stat().st_size <= 20 * 2**20
    assert spec.inference.threshold == spec.metrics["threshold"] and spec.metrics["dice_lung"] > 0.9
    folder = tmp_path / "in"
    folder.mkdir()
    cv2.imwrite(str(folder / "chest.png"), xray)
    (row,) = _predict(compose_cfg, "pretrained:lung_infection", folder, tmp_path / "out", "xray_check=false")
    assert all(0 <= float(row[f"{side}_lung_infected_percent"]) <= 100 for side in ("left", "right"))
    assert 0 <= int(float(row["zone_score"])) <= 6
    assert (cv2.imread(str(tmp_path / "out" / "chest.png") + ".lung.png", 0) > 0).any()  # the lungs it found


def test_predict_reads_dicom(compose_cfg, checkpoint, tmp_path) -> None:
    import shutil

    from pydicom.data import get_testdata_file

    folder = tmp_path / "dicom"
    folder.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), folder / "scan.dcm")  # 128x128, 16-bit
    (row,) = _predict(compose_cfg, checkpoint, folder, tmp_path / "out")
    assert (row["width"], row["height"]) == ("128", "128")
    assert cv2.imread(str(tmp_path / "out" / "scan.dcm.mask.png"), 0).shape == (128, 128)


def test_an_ensemble_evaluates_predicts_and_exports_as_one_model(
    compose_cfg, trained_checkpoints: list[Path], xrays: Path, tmp_path: Path
) -> None:
    from covidseg.core.metrics import SegmentationScores
    from covidseg.eval import evaluate

    a, b = trained_checkpoints
    ensemble = load_predictor([str(a), str(b)], tmp_path)
    assert (
        ensemble.description == f"ensemble of 2 models ({a.name}, {b.name})" and len(ensemble.predictor.networks) == 2
    )
    data = [o for o in FAST if o.startswith("data")]
    metrics = evaluate(compose_cfg("eval", [f"ckpt_path=[{a},{b}]", *data, "threshold=0.4"]))
    # the ensemble's Dice is that of the two models' averaged probabilities
    from hydra.utils import instantiate

    from covidseg.data import CovidQuExDataModule  # noqa: F401 (built from the same config)

    dataset = instantiate(compose_cfg("eval", [*data, "ckpt_path=x"]).data).dataset("Test")
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    truth = torch.stack([dataset[i]["mask"] for i in range(len(dataset))])
    singles = [load_predictor(str(path), tmp_path).predictor.predict(images).probability for path in (a, b)]
    scores = SegmentationScores(threshold=0.4, from_logits=False)
    scores.update(((singles[0] + singles[1]) / 2)[:, 0], truth[:, 0])
    assert metrics["test/dice"] == pytest.approx(float(scores.compute()["dice"]), abs=1e-6)

    path = export_onnx(ensemble, tmp_path / "ensemble" / "model.onnx")
    batch = torch.rand(6, 1, 64, 64)
    onnx_probability, onnx_presence = onnxruntime.InferenceSession(str(path)).run(None, {"image": batch.numpy()})
    expected = ensemble.predictor.predict(batch)
    assert np.abs(onnx_probability - expected.probability.numpy()).max() <= 1e-4
    assert np.abs(onnx_presence - expected.presence.numpy()).max() <= 1e-4
    assert np.mean((onnx_probability > 0.5) == expected.mask.numpy()) >= 0.999

    rows = _predict(compose_cfg, f"[{a},{b}]", xrays, tmp_path / "out")
    onnx_rows = _predict(compose_cfg, path, xrays, tmp_path / "onnx_out")
    assert [r["infected_pixels"] for r in rows] == [r["infected_pixels"] for r in onnx_rows]
    with pytest.raises(ModelFileError, match="cannot join an ensemble"):
        export = export_safetensors(load_predictor(str(a), tmp_path), tmp_path / "other" / "model.safetensors")
        spec = yaml.safe_load(export.with_suffix(".yaml").read_text())
        spec["image_size"] = 128
        export.with_suffix(".yaml").write_text(yaml.safe_dump(spec))
        load_predictor([str(a), str(export)], tmp_path)


def test_small_batches_give_the_same_rows_and_masks_in_input_order(compose_cfg, checkpoint, tmp_path) -> None:
    folder = tmp_path / "many"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for index in range(7):
        cv2.imwrite(str(folder / f"{index}.png"), rng.integers(0, 255, (40 + 9 * index, 64), dtype=np.uint8))
    (folder / "3.png").write_bytes(b"not an image")  # a gap in the middle batch
    by_two = compose_cfg("predict", [f"ckpt_path={checkpoint}", f"input={folder}", f"output={tmp_path / 'a'}",
                                     "batch_size=2", "bf16=false"])  # fmt: skip
    at_once = compose_cfg("predict", [f"ckpt_path={checkpoint}", f"input={folder}", f"output={tmp_path / 'b'}",
                                      "batch_size=8", "bf16=false"])  # fmt: skip
    pipelined, single = predict(by_two), predict(at_once)
    assert [Path(row["file"]).name for row in pipelined.rows] == ["0.png", "1.png", "2.png", "4.png", "5.png", "6.png"]
    assert [Path(path).name for path, _ in pipelined.skipped] == ["3.png"]
    drop_time = [{key: value for key, value in row.items() if key != "seconds"} for row in pipelined.rows]
    assert drop_time == [{key: value for key, value in row.items() if key != "seconds"} for row in single.rows]
    for row in pipelined.rows:
        name = Path(row["file"]).name
        mask = cv2.imread(str(tmp_path / "a" / f"{name}.mask.png"), cv2.IMREAD_UNCHANGED)
        assert int(row["infected_pixels"]) == int((mask > 0).sum())
        assert (mask == cv2.imread(str(tmp_path / "b" / f"{name}.mask.png"), cv2.IMREAD_UNCHANGED)).all()
