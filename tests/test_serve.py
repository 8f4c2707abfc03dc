"""The HTTP API (FastAPI's TestClient) and the server as users start it (a subprocess)."""

from __future__ import annotations

import base64
import json
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient
from helpers import dicom_bytes, png_bytes, run_command

from covidseg.core.config import compose_config
from covidseg.inference.loader import INFERENCE_KEYS
from covidseg.inference.segment import LoadedBackend, load_backend
from covidseg.predict import predict
from covidseg.serving.app import ServeSettings, create_app, png_base64

NO_OVERRIDES = dict.fromkeys(INFERENCE_KEYS)  # every inference setting as the model file has it
REPO = Path(__file__).resolve().parents[1]


def decode_png(text: str) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(base64.b64decode(text), np.uint8), cv2.IMREAD_UNCHANGED)


@pytest.fixture(scope="module")
def model() -> LoadedBackend:
    return load_backend("pretrained", "outputs", "torch", NO_OVERRIDES, False, Path(tempfile.gettempdir()))


@pytest.fixture(scope="module")
def client(model: LoadedBackend) -> TestClient:
    return TestClient(create_app(model, ServeSettings(max_upload_mb=1, max_pixels=4_000_000)))


def test_an_upload_is_segmented_as_predict_does_it(client: TestClient, xray: np.ndarray, compose_cfg, tmp_path):
    answer = client.post("/api/predict", files={"file": ("chest.png", png_bytes(xray), "image/png")}).json()
    assert (answer["file"], answer["format"], answer["width"], answer["height"]) == ("chest.png", "PNG", 280, 300)
    mask = decode_png(answer["mask_png"])
    assert mask.shape == (300, 280) and set(np.unique(mask)) <= {0, 255}
    assert int((mask > 0).sum()) == answer["infected_pixels"]
    assert decode_png(answer["overlay_png"]).shape == (300, 280, 3)
    assert 0 <= answer["severity"]["zone_score"] <= 6 and 0 <= answer["presence_probability"] <= 1
    assert "layers" not in answer

    (tmp_path / "in").mkdir()
    cv2.imwrite(str(tmp_path / "in" / "chest.png"), xray)
    paths = [f"input={tmp_path / 'in'}", f"output={tmp_path / 'out'}"]
    # the fixture runs torch in fp32 and without the x-ray check (a phantom is no X-ray)
    cfg = compose_cfg("predict", ["ckpt_path=pretrained", "backend=torch", "bf16=false", "xray_check=false", *paths])
    row = predict(cfg).rows[0]
    for key in ("infected_pixels", "infected_percent", "mean_probability", "presence_probability"):
        assert answer[key] == row[key], key
    written = cv2.imread(str(tmp_path / "out" / "chest.png.mask.png"), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(written, mask)


def test_raw_bytes_layers_and_the_type_from_the_content(client: TestClient, xray: np.ndarray) -> None:
    multipart = client.post("/api/predict", files={"file": ("a.png", png_bytes(xray), "image/png")}).json()
    raw = client.post(
        "/api/predict?layers=true",
        content=png_bytes(xray),
        headers={"content-type": "application/octet-stream", "x-filename": "raw.png"},
    ).json()
    assert raw["file"] == "raw.png" and raw["infected_pixels"] == multipart["infected_pixels"]
    layers = raw["layers"]
    assert np.array_equal(decode_png(layers["image"]), xray)
    infection = decode_png(layers["infection"])
    assert infection.shape == (300, 280, 4) and (infection[..., 3] > 0).sum() >= raw["infected_pixels"]
    assert decode_png(layers["lungs"]).shape == (300, 280, 4)  # the shipped model outlines the lungs
    # a JPEG named .png, and a 16-bit TIFF named .bmp: decoded by what they are
    as_jpeg = client.post("/api/predict", files={"file": ("x.png", png_bytes(xray, ".jpg"), "image/png")}).json()
    assert as_jpeg["format"] == "JPEG" and as_jpeg["width"] == 280
    tiff16 = png_bytes(xray.astype(np.uint16) * 257, ".tiff")
    as_tiff = client.post("/api/predict", files={"file": ("x.bmp", tiff16, "image/bmp")}).json()
    assert (as_tiff["format"], as_tiff["width"], as_tiff["height"]) == ("TIFF", 280, 300)


def test_a_dicom_upload_is_read_by_its_content(client: TestClient, xray: np.ndarray) -> None:
    pytest.importorskip("pydicom")
    data = dicom_bytes(xray.astype(np.uint16) * 16, BitsStored=12, HighBit=11)
    answer = client.post("/api/predict", files={"file": ("study", data, "application/dicom")}).json()
    assert (answer["format"], answer["width"], answer["height"]) == ("DICOM", 280, 300)


def bomb_png() -> bytes:
    """A small PNG file (zeros compress well) that decodes to 3000 x 3000 = 9 M pixels."""
    return png_bytes(np.zeros((3000, 3000), np.uint8))


@pytest.mark.parametrize(
    ("files", "status", "message"),
    [
        ({"file": ("a.png", b"", "image/png")}, 422, "is empty"),
        ({"file": ("a.png", b"GIF89a not really", "image/png")}, 422, "judged by its content"),
        ({"file": ("a.png", "truncated", "image/png")}, 422, "corrupt or truncated"),
        ({"file": ("big.png", "bomb", "image/png")}, 422, "9,000,000 pixels; at most 4,000,000"),
        ({"file": ("a.png", b"x" * (1024 * 1024 + 1), "image/png")}, 413, "larger than the limit of 1,048,576 bytes"),
        ({"image": ("a.png", b"x", "image/png")}, 422, "no file field named 'file'"),
        ({"file": ("a.png", png_bytes(np.full((300, 280), 7, np.uint8)), "image/png")}, 422, "a single grey level (7)"),
        ({"file": ("a.png", png_bytes(np.zeros((300, 280, 4), np.uint8)), "image/png")}, 422, "a single grey level"),
        ({"file": ("a.png", png_bytes(np.full((9, 9), 65535, np.uint16)), "image/png")}, 422, "is 9x9 pixels"),
        ({"file": ("a.png", png_bytes(np.eye(40, 400, dtype=np.uint8)), "image/png")}, 422, "is 400x40 pixels"),
        (
            {"file": ("a.png", png_bytes(np.indices((64, 64, 3)).sum(0).astype(np.uint8) * 40), "image/png")},
            422,
            "is a colour picture",
        ),
    ],
    ids=[
        "empty",
        "not-an-image",
        "truncated",
        "bomb",
        "too-large",
        "wrong-field",
        "blank",
        "blank-rgba",
        "tiny",
        "strip",
        "colour",
    ],
)
def test_bad_uploads_get_one_line_of_json(client: TestClient, xray: np.ndarray, files, status, message) -> None:
    name, content, kind = next(iter(files.values()))
    if content == "truncated":
        content = png_bytes(xray)[:300]
    elif content == "bomb":
        content = bomb_png()
    response = client.post("/api/predict", files={next(iter(files)): (name, content, kind)})
    assert response.status_code == status
    error = response.json()["error"]
    assert message in error and "\n" not in error
    assert str(REPO) not in response.text and "Traceback" not in response.text


def test_more_bad_requests(client: TestClient, xray: np.ndarray) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is counted as the body streams in
        for _ in range(40):
            yield b"\0" * 65536

    streamed = client.post("/api/predict", content=chunks(), headers={"content-type": "application/octet-stream"})
    assert streamed.status_code == 413
    assert client.post("/api/predict", data={"file": "x"}).status_code == 415
    broken = client.post(
        "/api/predict", content=b"--zz\r\nnonsense", headers={"content-type": "multipart/form-data; boundary=zz"}
    )
    assert broken.status_code in (400, 422) and "error" in broken.json()
    two = client.post("/api/predict", files=[("file", ("a.png", b"1")), ("file", ("b.png", b"2"))])
    assert two.status_code == 400 and "Too many files" in two.json()["error"]
    assert client.post("/api/predict?layers=maybe", content=png_bytes(xray)).status_code == 422
    assert client.get("/api/nothing").json() == {"error": "Not Found"}
    assert client.get("/static/../serve.py").status_code == 404
    odd_name = (
        b'--zz\r\nContent-Disposition: form-data; name="file"; filename="<img src=x onerror=alert(1)>\xff.png"\r\n'
        b"Content-Type: image/png\r\n\r\nzz\r\n--zz--\r\n"
    )
    odd = client.post("/api/predict", content=odd_name, headers={"content-type": "multipart/form-data; boundary=zz"})
    assert odd.status_code == 422 and odd.headers["content-type"] == "application/json"
    assert "<img src=x onerror=alert(1)>" in odd.json()["error"]  # JSON text; the page shows it as text


def test_model_health_page_and_headers(client: TestClient, model: LoadedBackend) -> None:
    card = client.get("/api/model").json()
    assert card["id"].startswith("lung_infection-") and card["files"] == ["lung_infection.safetensors"]
    assert card["targets"] == ["lung", "infection"] and card["image_size"] == 256
    assert card["inference"]["threshold"] == model.spec.inference.threshold
    assert card["metrics"]["dice"] == model.spec.metrics["dice"]
    assert client.get("/healthz").json() == {"status": "ok", "model": card["id"]}
    page = client.get("/")
    assert page.status_code == 200 and 'id="infected-percent"' in page.text
    assert "http" not in page.text.split("<body>")[0]  # nothing fetched from elsewhere
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    assert "access-control-allow-origin" not in client.get("/healthz", headers={"origin": "http://x.test"}).headers
    assert client.get("/openapi.json").json()["paths"]["/api/predict"]["post"]["requestBody"]["required"]


def test_cors_only_when_configured(model: LoadedBackend) -> None:
    client = TestClient(create_app(model, ServeSettings(cors_origins=["http://lab.test"])))
    allowed = client.get("/healthz", headers={"origin": "http://lab.test"})
    assert allowed.headers["access-control-allow-origin"] == "http://lab.test"
    other = client.get("/healthz", headers={"origin": "http://other.test"})
    assert "access-control-allow-origin" not in other.headers


def test_a_request_writes_nothing_to_disk(model: LoadedBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 2 MB upload, above Starlette's default 1 MB spool, stays in memory (no temporary file)."""
    rolled: list[str] = []
    monkeypatch.setattr(tempfile, "TemporaryFile", lambda *args, **kwargs: rolled.append("TemporaryFile"))
    client = TestClient(create_app(model, ServeSettings(max_upload_mb=3)))
    data = png_bytes(np.random.default_rng(0).integers(0, 256, (1500, 1400), np.uint8))
    assert 2_000_000 < len(data) < 3 * 1024 * 1024
    response = client.post("/api/predict", files={"file": ("noise.png", data, "image/png")})
    assert response.status_code == 200 and rolled == []


def slow_model(model: LoadedBackend, gate: threading.Event, running: list[int], peak: list[int]) -> LoadedBackend:
    def run(images):
        running.append(1)
        peak.append(len(running))
        gate.wait(10)
        try:
            return model.run(images)
        finally:
            running.pop()

    return LoadedBackend(run, model.spec, model.paths)


def test_requests_queue_in_a_bounded_pool_and_a_full_queue_answers_503(model: LoadedBackend, xray) -> None:
    gate, running, peak = threading.Event(), [], []
    settings = ServeSettings(workers=1, max_queue=2)
    data = png_bytes(xray)
    statuses: list[int] = []
    # one event loop for every request, as under uvicorn
    with TestClient(create_app(slow_model(model, gate, running, peak), settings)) as client:

        def send() -> None:
            statuses.append(client.post("/api/predict", files={"file": ("a.png", data, "image/png")}).status_code)

        threads = [threading.Thread(target=send) for _ in range(3)]  # one runs, two wait
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 10
        while not running and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)
        assert client.post("/api/predict", files={"file": ("a.png", data, "image/png")}).status_code == 503
        gate.set()
        for thread in threads:
            thread.join(30)
    assert statuses == [200, 200, 200] and max(peak) == 1


def readme_curl_commands() -> list[str]:
    """The ``curl`` lines of the README's server section."""
    return [line.strip() for line in (REPO / "README.md").read_text().splitlines() if line.startswith("curl ")]


@pytest.mark.slow
def test_the_readme_curl_examples_run_as_written(server: str, xray: np.ndarray, tmp_path: Path) -> None:
    """Each curl line of the README, pointed at this server's port, in a folder holding chest.png."""
    (tmp_path / "chest.png").write_bytes(png_bytes(xray))
    commands = readme_curl_commands()
    assert len(commands) >= 3
    answers = []
    for command in commands:
        command = command.replace("http://127.0.0.1:8000", server)
        result = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True, check=True)
        answers.append(json.loads(result.stdout))
    predictions = [answer for answer in answers if "infected_pixels" in answer]
    assert len(predictions) >= 2 and len({answer["infected_pixels"] for answer in predictions}) == 1
    assert any(answer.get("status") == "ok" for answer in answers)


@pytest.mark.parametrize(
    ("override", "message"),
    [("port=70000", "port=70000: Input should be less than or equal to 65535"), ("ckpt_path=nope.ckpt", "nope.ckpt")],
)
def test_bad_server_settings_are_one_line_and_exit_2(
    override: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from covidseg.serve import main

    assert run_command(main, override, f"hydra.run.dir={tmp_path}") == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error and len(error.strip().splitlines()) == 1


def test_serve_config_composes() -> None:
    cfg = compose_config("serve", ["port=0"])
    assert (cfg.host, cfg.ckpt_path, cfg.workers) == ("127.0.0.1", "pretrained", 2)


@pytest.mark.slow
def test_a_lung_model_answers_severity_and_lung_outlines(tmp_path: Path, cache_dir: Path, xray: np.ndarray) -> None:
    from conftest import train_tiny

    checkpoint = train_tiny(tmp_path, cache_dir, "data.targets=[lung,infection]")
    model = load_backend(str(checkpoint), tmp_path, "torch", NO_OVERRIDES, False, tmp_path)
    client = TestClient(create_app(model, ServeSettings()))
    answer = client.post("/api/predict?layers=true", files={"file": ("chest.png", png_bytes(xray))}).json()
    severity = answer["severity"]
    assert set(severity) >= {"right_lung_infected_percent", "left_lung_infected_percent", "zone_score"}
    assert 0 <= severity["zone_score"] <= 6
    lungs = decode_png(answer["layers"]["lungs"])
    assert lungs.shape == (300, 280, 4)
    assert decode_png(answer["layers"]["zones"]).shape == (300, 280, 4)
    assert client.get("/api/model").json()["targets"] == ["lung", "infection"]


def test_the_zone_layer_outlines_six_zones_and_tints_the_involved_ones() -> None:
    from covidseg.inference.model_spec import InferenceSettings
    from covidseg.inference.segment import ImageResult
    from covidseg.serving.app import zone_layer

    lung = np.zeros((90, 100), np.float32)
    lung[0:90, 10:40] = lung[0:90, 60:90] = 1.0  # two lungs, 90 rows each: zones of 30 rows
    infection = np.zeros_like(lung)
    infection[60:90, 10:40] = 1.0  # the image-left lung's lower third only: the patient's right lower zone
    result = ImageResult(np.zeros((90, 100), np.uint8), infection, lung, None, InferenceSettings())
    layer = decode_png(png_base64(zone_layer(result)))
    tinted = layer[..., 3] == 90
    assert tinted[65:85, 15:35].all() and not tinted[:55].any() and not tinted[:, 50:].any()
    assert (layer[..., 3] == 200).any()  # the zones' outlines
    assert result.severity()["right_lower_zone"] == 1 and result.severity()["zone_score"] == 1
    no_lungs = ImageResult(np.zeros((90, 100), np.uint8), infection, None, None, InferenceSettings())
    assert zone_layer(no_lungs) is None


def test_requests_sent_together_share_a_forward_pass_and_get_the_answers_they_get_alone(model: LoadedBackend) -> None:
    """Eight different X-rays from eight clients at once, batched (up to 8 per forward pass, 200 ms
    to gather them) and one at a time: the same answers, byte for byte, and fewer forward passes."""
    from covidseg.data.synthetic import make_phantom

    rng = np.random.default_rng(5)
    xrays = [make_phantom(rng, 200 + 8 * index, infected=index % 2 == 0)[0] for index in range(8)]
    answers = {}
    for max_batch in (1, 8):
        settings = ServeSettings(max_batch=max_batch, max_wait_ms=200, workers=4)
        app = create_app(model, settings)
        batcher, passes = app.state.segmenter.batcher, []

        def counted(images: list, run=batcher.run_batch, passes: list = passes) -> list:
            passes.append(len(images))
            return run(images)

        batcher.run_batch = counted
        with TestClient(app) as client:
            replies: dict[int, dict] = {}

            def send(index: int, client: TestClient = client, replies: dict = replies) -> None:
                files = {"file": (f"{index}.png", png_bytes(xrays[index]), "image/png")}
                replies[index] = client.post("/api/predict", files=files).json()

            threads = [threading.Thread(target=send, args=(index,)) for index in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=120)
        answers[max_batch] = [{k: v for k, v in replies[i].items() if k != "seconds"} for i in range(8)]
        assert sum(passes) == 8 and (max(passes) == 1 if max_batch == 1 else len(passes) < 8), passes
    assert answers[8] == answers[1]
