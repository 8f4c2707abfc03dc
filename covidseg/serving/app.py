"""The server's app: a page to drop an X-ray on, and a JSON API for other tools (FastAPI).

``GET /`` the page; ``POST /api/predict`` an image (multipart field ``file``, or the raw bytes as
the body) -> JSON with the statistics and the mask and overlay as base64 PNGs; ``GET /api/model``
the model's card data; ``GET /healthz``; OpenAPI at ``/docs``. ``python -m covidseg.serve`` loads
the model once, through the same loader and Predictor as ``predict`` (:mod:`covidseg.inference.segment`),
and runs this app with uvicorn.

Requests are segmented in a bounded pool (``workers``) with at most ``max_queue`` waiting (503
beyond), so concurrent clients queue instead of oversubscribing the CPU. An upload is counted as
it streams in (413 beyond ``max_upload_mb``) and kept in memory: Starlette's multipart parser is
used with its spool size raised to that limit, so a request writes nothing to disk. The type is
found from the content and the pixel count is checked before decoding (:mod:`covidseg.core.images`).
Every error is one line of JSON (``{"error": ...}``) without a traceback or a server path.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import math
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import cv2
import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from omegaconf import DictConfig, OmegaConf
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from covidseg.core.errors import ConfigError, DataError
from covidseg.core.files import printable
from covidseg.core.images import decode_unchanged, xray_gray
from covidseg.core.validation import validated
from covidseg.core.visualize import LUNG_COLOR, PREDICTION_COLOR, outline
from covidseg.inference.segment import ImageResult, LoadedBackend, segment

log = logging.getLogger(__name__)
ZONE_COLOR = (255, 170, 0)  # RGB: an involved lung zone on the page (the infection is red, the lungs yellow)
WEB = Path(__file__).parent / "web"
MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers around the file in a multipart body
RAW_TYPES = ("multipart/form-data", "application/octet-stream", "application/dicom", "")
DRAIN_LIMIT = 4  # an over-limit body is read (and dropped) up to this many times the limit, then cut
NAME_LENGTH = 200  # an uploaded file name is cut to this many characters in answers and logs
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
PAGE_POLICY = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'"


class ServeSettings(BaseModel):
    """The server's limits (``conf/serve.yaml``), checked before the model is loaded."""

    model_config = ConfigDict(extra="forbid", strict=True)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(2, ge=1, le=64)
    max_queue: int = Field(64, ge=0)
    max_batch: int = Field(8, ge=1, le=256)
    max_wait_ms: float = Field(20.0, ge=0, le=1000, allow_inf_nan=False)
    max_upload_mb: float = Field(20, gt=0)
    max_pixels: int = Field(50_000_000, ge=1)
    cors_origins: list[str] = []

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


def serve_settings(cfg: DictConfig) -> ServeSettings:
    config = OmegaConf.to_container(cfg, resolve=True)
    values = {key: config[key] for key in ServeSettings.model_fields if key in config}
    return validated(ServeSettings, values)


def check_address(settings: ServeSettings) -> None:
    """``host`` and ``port`` can be listened on, checked before the model loads: uvicorn would say
    so only afterwards, in several lines and with exit code 3."""
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(settings.host, settings.port, type=socket.SOCK_STREAM)[
            0
        ]
    except (socket.gaierror, UnicodeError) as error:
        reason = getattr(error, "strerror", None) or error
        raise ConfigError(
            f"host={settings.host!r}: {reason}; expected an address of this machine, e.g. 127.0.0.1"
        ) from None
    with socket.socket(family, kind, protocol) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as error:
            raise ConfigError(
                f"host={settings.host!r} port={settings.port}: {error.strerror or error}; choose a free port "
                "on an address of this machine"
            ) from None


class ApiError(Exception):
    """An answer other than 200: the status and one line for the client."""

    def __init__(self, status: int, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.details = status, message, details or {}


def png_base64(array: np.ndarray) -> str:
    """An image (gray, BGR or BGRA uint8) as base64 PNG text."""
    encoded, data = cv2.imencode(".png", array)
    if not encoded:
        raise ValueError("PNG encoding failed")
    return base64.b64encode(data.tobytes()).decode("ascii")


def layer_pngs(result: ImageResult) -> dict[str, str | None]:
    """What the page stacks: the X-ray as the model saw it (8-bit gray), the infection as a
    transparent red layer (its opacity is the page's), and the lung outlines as a transparent layer."""
    height, width = result.image.shape
    infection = np.zeros((height, width, 4), np.uint8)
    infection[result.mask] = (*PREDICTION_COLOR[::-1], 255)  # BGRA
    lungs = zone_grid = None
    if result.lung is not None:
        drawn = outline(np.zeros((height, width, 3), np.uint8), result.lung, LUNG_COLOR[::-1])
        lungs = np.dstack([drawn, drawn.any(axis=2).astype(np.uint8) * 255])
        zone_grid = zone_layer(result)
    return {
        "image": png_base64(result.image),
        "infection": png_base64(infection),
        "lungs": None if lungs is None else png_base64(lungs),
        "zones": None if zone_grid is None else png_base64(zone_grid),
    }


def zone_layer(result: ImageResult) -> np.ndarray | None:
    """The six lung zones as a transparent BGRA layer: each zone outlined, the involved ones tinted."""
    found = result.zones()
    if found is None:
        return None
    height, width = result.image.shape
    layer = np.zeros((height, width, 4), np.uint8)
    for mask, involved in found.values():
        if involved:
            layer[mask] = (*ZONE_COLOR[::-1], 90)
    for mask, _ in found.values():
        edge = outline(np.zeros((height, width, 3), np.uint8), mask, (255, 255, 255)).any(axis=2)
        layer[edge] = (255, 255, 255, 200)
    return layer


def model_info(model: LoadedBackend) -> dict[str, Any]:
    """What ``GET /api/model`` says: an id from the weights' bytes, the networks, sizes, targets,
    inference settings and the Val metrics and recipe recorded in the model file (names, no paths)."""
    digest = hashlib.sha256()
    for path in model.paths:
        digest.update(path.read_bytes())
    spec = model.spec
    names = [path.name for path in model.paths]
    return {
        "id": f"{Path(names[0]).stem}-{digest.hexdigest()[:12]}",
        "files": names,
        "networks": [
            {"name": network.name, "input_size": network.input_size, "presence_head": network.presence_head}
            for network in spec.networks
        ],
        "targets": spec.targets,
        "image_size": spec.image_size,
        "inference": spec.inference.model_dump(),
        "metrics": spec.metrics,
    }


class Batcher:
    """Images that arrive together share one forward pass. The first image of a batch starts a task
    that, while ``more_coming()`` says other uploads are still being decoded, waits up to
    ``max_wait`` seconds for them, up to ``max_batch``, and runs the batch; images that arrive
    meanwhile form the next one (one batch runs at a time: each uses every core). A lone request
    never waits. The task ends when no image waits, so nothing outlives the requests, and a client
    that leaves does not stop it. ``segment`` answers each image of a batch as it would alone."""

    def __init__(
        self,
        run_batch: Callable[[list[np.ndarray]], list[ImageResult]],
        max_batch: int,
        max_wait: float,
        more_coming: Callable[[], bool],
    ):
        self.run_batch, self.max_batch, self.max_wait, self.more_coming = run_batch, max_batch, max_wait, more_coming
        self.waiting: list[tuple[np.ndarray, asyncio.Future]] = []
        self.running: asyncio.Task | None = None

    async def segment(self, image: np.ndarray) -> ImageResult:
        loop = asyncio.get_running_loop()
        answer = loop.create_future()
        self.waiting.append((image, answer))
        if self.running is None or self.running.done():
            self.running = loop.create_task(self._run_batches())
        return await answer

    async def _run_batches(self) -> None:
        while self.waiting:
            deadline = asyncio.get_running_loop().time() + self.max_wait
            while len(self.waiting) < self.max_batch and self.more_coming():
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    break
                await asyncio.sleep(min(left, 0.001))  # the uploads being decoded join this batch
            batch, self.waiting = self.waiting[: self.max_batch], self.waiting[self.max_batch :]
            try:
                results = await anyio.to_thread.run_sync(self.run_batch, [image for image, _ in batch])
            except Exception as error:  # every request of the batch gets it (a 500 from the app's handler)
                for _, answer in batch:
                    if not answer.done():
                        answer.set_exception(error)
                continue
            for (_, answer), result in zip(batch, results, strict=True):
                if not answer.done():  # its client may have gone
                    answer.set_result(result)


class Segmenter:
    """The loaded model behind the API: each upload is decoded and described in the worker pool
    (``workers`` threads); the images meet in batches for the networks (:class:`Batcher`)."""

    def __init__(self, model: LoadedBackend, settings: ServeSettings) -> None:
        self.model, self.settings = model, settings
        self.card = model_info(model)
        self.limiter = anyio.CapacityLimiter(settings.workers)
        self.decoding, self.waiting = 0, 0
        self.batcher = Batcher(
            self.segment_batch, settings.max_batch, settings.max_wait_ms / 1000, lambda: self.decoding > 0
        )

    def segment_batch(self, images: list[np.ndarray]) -> list[ImageResult]:
        return segment(self.model.run, self.model.spec, images, self.model.refuse_above)

    def decode(self, data: bytes, name: str) -> tuple[np.ndarray, str]:
        decoded, found = decode_unchanged(data, name, self.settings.max_pixels)
        return xray_gray(decoded, name), found

    def describe(self, result: ImageResult, name: str, found: str, layers: bool, started: float) -> dict[str, Any]:
        inference = self.model.spec.inference
        answer = {
            "file": name,
            "format": found,
            **result.stats(),
            "severity": result.severity(),
            "threshold": inference.threshold,
            "presence_threshold": inference.presence_threshold,
            "min_region_share": inference.min_region_share,
            "xray_threshold": self.model.refuse_above,
            "model": self.card["id"],
            "mask_png": png_base64(result.mask.astype(np.uint8) * 255),
            "overlay_png": png_base64(cv2.cvtColor(result.overlay(), cv2.COLOR_RGB2BGR)),
        }
        if layers:
            answer["layers"] = layer_pngs(result)
        return answer | {"seconds": round(time.perf_counter() - started, 4)}

    async def run(self, data: bytes, name: str, layers: bool) -> dict[str, Any]:
        """Queue for a worker (503 when ``max_queue`` requests already wait)."""
        if self.waiting >= self.settings.max_queue + self.settings.workers:
            raise ApiError(503, f"the server is busy: {self.waiting} requests are queued; try again shortly")
        self.waiting += 1
        try:
            started = time.perf_counter()
            self.decoding += 1
            try:
                image, found = await anyio.to_thread.run_sync(self.decode, data, name, limiter=self.limiter)
            finally:
                self.decoding -= 1
            result = await self.batcher.segment(image)
            if result.refused:
                score = (
                    result.xray_score if result.xray_score is not None and math.isfinite(result.xray_score) else None
                )
                details = {"refused": True, "xray_score": score, "xray_threshold": result.refuse_above}
                raise ApiError(422, f"{name}: {result.refusal()}", details)
            return await anyio.to_thread.run_sync(
                self.describe, result, name, found, layers, started, limiter=self.limiter
            )
        finally:
            self.waiting -= 1


async def read_upload(request: Request, limit: int) -> tuple[bytes, str]:
    """The uploaded file's bytes and name, read into memory and refused (413) past ``limit`` bytes."""
    too_large = ApiError(413, f"the upload is larger than the limit of {limit:,} bytes (max_upload_mb)")
    body_limit = limit + MULTIPART_OVERHEAD
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > body_limit:
        raise too_large

    async def counted():
        total, stream = 0, request.stream()
        async for chunk in stream:
            total += len(chunk)
            if total > body_limit:
                # read and drop what the client still sends, up to a bound, so that it can read the 413
                # (a connection closed on unread data is reset before the answer arrives)
                async for rest in stream:
                    total += len(rest)
                    if total > DRAIN_LIMIT * body_limit:
                        break
                raise too_large
            yield chunk

    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in RAW_TYPES and not content_type.startswith("image/"):
        raise ApiError(
            415, f"Content-Type {content_type!r}: send multipart/form-data with a field 'file', or the image bytes"
        )
    if content_type == "multipart/form-data":
        parser = MultiPartParser(request.headers, counted(), max_files=1, max_fields=16)
        parser.spool_max_size = body_limit  # the file stays in memory: nothing is written to disk
        try:
            form = await parser.parse()
        except MultiPartException as error:
            raise ApiError(400, f"the multipart body could not be read: {error.message}") from None
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(422, "the form has no file field named 'file'")
        data, name = await upload.read(), upload.filename or "upload"
        await form.close()
    else:
        data, name = b"".join([chunk async for chunk in counted()]), request.headers.get("x-filename", "upload")
    if len(data) > limit:
        raise too_large
    return data, printable(name)[:NAME_LENGTH]


def error_response(status: int, message: str, details: dict[str, Any] | None = None) -> JSONResponse:
    return JSONResponse({"error": " ".join(message.split()), **(details or {})}, status_code=status)


UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def create_app(model: LoadedBackend, settings: ServeSettings) -> FastAPI:
    """The FastAPI application around one loaded model."""
    segmenter = Segmenter(model, settings)
    app = FastAPI(
        title="covidseg",
        summary="Segment COVID-19 infection (and lungs) in chest X-rays. Research use, not a diagnostic device.",
        version="1",
    )
    app.state.segmenter = segmenter  # the model behind the routes, for tests and tools
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"])

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        if not request.url.path.startswith(("/docs", "/redoc")):
            response.headers["Content-Security-Policy"] = PAGE_POLICY
        return response

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return error_response(error.status, error.message, error.details)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return error_response(error.status_code, str(error.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()))
        return error_response(422, f"{where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, "internal error: the server could not answer this request (see its log)")

    app.mount("/static", StaticFiles(directory=WEB), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(WEB / "index.html")

    @app.get("/healthz")
    async def health() -> dict[str, str]:
        """Liveness: the model is loaded."""
        return {"status": "ok", "model": segmenter.card["id"]}

    @app.get("/api/model")
    async def model_info() -> dict[str, Any]:
        """The model's card data: id, networks, sizes, targets, thresholds, Val metrics and recipe."""
        return segmenter.card

    @app.post("/api/predict", openapi_extra=UPLOAD_BODY)
    async def predict(request: Request, layers: bool = False) -> dict[str, Any]:
        """Segment one X-ray (PNG, JPEG, TIFF, BMP or DICOM; the type is read from the content).

        Answers the image size and format, infected pixels and percent, mean probability inside the
        mask, presence probability (presence-head models), severity (lung models), thresholds,
        model id, seconds, and ``mask_png`` / ``overlay_png`` as base64 PNGs at the image's size;
        ``layers=true`` adds the page's layers (X-ray, infection, lung outlines).
        """
        try:
            data, name = await read_upload(request, settings.max_upload_bytes)
        except ClientDisconnect:  # the client went away mid-upload: one line in the log, no one to answer
            log.info("a client disconnected during its upload to %s", request.url.path)
            raise ApiError(400, "the client disconnected during the upload") from None
        try:
            return await segmenter.run(data, name, layers)
        except DataError as error:
            raise ApiError(422, str(error)) from None

    return app
