import csv
import json
from pathlib import Path

import cv2
import numpy as np
import onnxruntime
import pytest
import torch
from conftest import FAST

from covidseg.checkpoints import CheckpointError, module_from_checkpoint
from covidseg.data import DataError
from covidseg.export import export_onnx, export_torchscript
from covidseg.predict import predict
from covidseg.train import train


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """One tiny trained model shared by this module's tests."""
    import hydra
    from conftest import CONF_DIR
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    out = tmp_path_factory.mktemp("trained")
    GlobalHydra.instance().clear()
    with hydra.initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = hydra.compose("train", overrides=[*FAST, "test=false", "logger=csv"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.log_dir, cfg.paths.output_dir, cfg.paths.cache_dir = str(out), str(out / "run"), str(cache_dir)
        del cfg["hydra"]
    train(cfg)
    return out / "run" / "checkpoints" / "last.ckpt"


@pytest.fixture
def xrays(tmp_path: Path) -> Path:
    """Images of odd sizes and formats, and one corrupt file."""
    folder = tmp_path / "xrays"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    cv2.imwrite(str(folder / "gray.png"), rng.integers(0, 255, (300, 250), dtype=np.uint8))
    cv2.imwrite(str(folder / "rgb.jpg"), rng.integers(0, 255, (97, 131, 3), dtype=np.uint8))
    cv2.imwrite(str(folder / "sub" / "deep.tif"), rng.integers(0, 65535, (64, 80), dtype=np.uint16))
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    return folder


def _predict(compose_cfg, checkpoint: Path, xrays: Path, output: Path, *extra: str) -> list[dict]:
    cfg = compose_cfg("predict", [f"ckpt_path={checkpoint}", f"input={xrays}", f"output={output}", *extra])
    with (predict(cfg)).open() as handle:
        return list(csv.DictReader(handle))


def test_predict_writes_masks_at_input_size_overlays_and_csv(compose_cfg, checkpoint, xrays, tmp_path) -> None:
    rows = _predict(compose_cfg, checkpoint, xrays, tmp_path / "out", "save_probability=true")
    assert sorted(Path(row["file"]).name for row in rows) == ["deep.tif", "gray.png", "rgb.jpg"]
    for row in rows:
        source = Path(row["file"])
        stem = tmp_path / "out" / source.relative_to(xrays).with_suffix("")
        mask = cv2.imread(str(stem) + "_mask.png", cv2.IMREAD_UNCHANGED)
        original = cv2.imread(str(source), cv2.IMREAD_UNCHANGED)
        assert mask.shape == original.shape[:2] and set(np.unique(mask)) <= {0, 255}
        assert cv2.imread(str(stem) + "_overlay.png").shape == (*original.shape[:2], 3)
        assert Path(str(stem) + "_probability.png").is_file()
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
    module, config = module_from_checkpoint(checkpoint)
    path = export_onnx(module, config, tmp_path / "export" / "model.onnx")
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["image_size"] == 64 and meta["targets"] == ["infection"]
    batch = torch.rand(5, 1, 64, 64)  # a batch size other than the exported example's
    session = onnxruntime.InferenceSession(str(path))
    onnx_logits = session.run(None, {"image": batch.numpy()})[0]
    with torch.no_grad():
        torch_logits = module(batch).numpy()
    assert np.abs(onnx_logits - torch_logits).max() <= 1e-4

    torch_rows = _predict(compose_cfg, checkpoint, xrays, tmp_path / "torch")
    onnx_rows = _predict(compose_cfg, path, xrays, tmp_path / "onnx")
    assert [row["infected_pixels"] for row in torch_rows] == [row["infected_pixels"] for row in onnx_rows]
    for row in torch_rows:
        name = Path(row["file"]).relative_to(xrays).with_suffix("")
        torch_mask = cv2.imread(str(tmp_path / "torch" / name) + "_mask.png", 0)
        onnx_mask = cv2.imread(str(tmp_path / "onnx" / name) + "_mask.png", 0)
        assert np.array_equal(torch_mask, onnx_mask)
    with pytest.raises(CheckpointError, match="presence_threshold cannot change an exported .onnx graph"):
        _predict(compose_cfg, path, xrays, tmp_path / "gated", "presence_threshold=0.5")
    higher = _predict(compose_cfg, path, xrays, tmp_path / "higher", "threshold=0.9")  # read from the probabilities
    assert all(int(h["infected_pixels"]) <= int(t["infected_pixels"]) for h, t in zip(higher, torch_rows, strict=True))


def test_torchscript_export_matches_pytorch(checkpoint, tmp_path) -> None:
    module, config = module_from_checkpoint(checkpoint)
    path = export_torchscript(module, config, tmp_path / "model.pt")
    batch = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(path))(batch), module(batch), atol=1e-5, rtol=1e-4)


def test_safetensors_export_loads_without_pickle_and_predicts_alike(checkpoint, tmp_path) -> None:
    from covidseg.export import export_safetensors

    module, config = module_from_checkpoint(checkpoint)
    path = export_safetensors(module, config | {"metrics": {"val/dice": 0.5}}, tmp_path / "model.safetensors")
    shipped, shipped_config = module_from_checkpoint(path)
    assert shipped_config["metrics"] == {"val/dice": 0.5}
    batch = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(shipped(batch), module(batch), atol=0.05, rtol=0.01)  # fp16 weights


def test_shipped_model_predicts_out_of_the_box(compose_cfg, xrays, tmp_path) -> None:
    from covidseg.checkpoints import PRETRAINED, load_checkpoint

    assert PRETRAINED.stat().st_size <= 20 * 2**20
    config = load_checkpoint(PRETRAINED)["covidseg_config"]
    assert config["metrics"]["dice"] > 0.7 and config["data"]["image_size"] == 256
    rows = _predict(compose_cfg, "pretrained", xrays, tmp_path / "out")
    assert len(rows) == 3 and all(float(row["infected_percent"]) >= 0 for row in rows)


def test_predict_reads_dicom(compose_cfg, checkpoint, tmp_path) -> None:
    import shutil

    from pydicom.data import get_testdata_file

    folder = tmp_path / "dicom"
    folder.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), folder / "scan.dcm")  # 128x128, 16-bit
    (row,) = _predict(compose_cfg, checkpoint, folder, tmp_path / "out")
    assert (row["width"], row["height"]) == ("128", "128")
    assert cv2.imread(str(tmp_path / "out" / "scan_mask.png"), 0).shape == (128, 128)
