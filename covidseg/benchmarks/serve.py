"""Load benchmark of the server: start ``covidseg.serve`` on 127.0.0.1, send many requests from
concurrent clients, and report throughput, latency percentiles, errors and the server's memory.

python -m covidseg.benchmarks.serve [--requests 200] [--concurrency 16] [--image FILE] [--out DIR] [serve overrides]

The image is a Val X-ray of ../shared/covid-qu-ex when it is there, else a synthetic phantom. The
server's resident memory (Linux ``/proc``) is read after the warm-up requests, half-way and at the
end, so a leak shows as growth after warm-up. It asserts nothing: targets are read off the table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import httpx
import numpy as np

from covidseg.benchmarks.throughput import SHARED_DATA
from covidseg.core.errors import DataError, say_error, user_errors, whole_number
from covidseg.core.files import read_file_bytes
from covidseg.core.images import MAX_FILE_BYTES, decode_unchanged, xray_gray
from covidseg.core.writing import new_figures_folder, write_atomic
from covidseg.data.synthetic import make_phantom


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rss_mib(pid: int) -> dict[str, float]:
    """Resident (``VmRSS``) and peak resident (``VmHWM``) memory of a process, in MiB."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    return {key: int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM") if key in fields}


def read_image(path: Path) -> tuple[bytes, str]:
    """The bytes to send as they are, from a file that must exist and hold an X-ray the server
    answers for: a benchmark of refusals would time nothing but error answers."""
    try:
        data = read_file_bytes(path, MAX_FILE_BYTES, "an image file", DataError)
    except OSError as error:
        raise DataError(f"--image {str(path)!r}: {error.strerror or error}") from None
    xray_gray(decode_unchanged(data, f"--image {path}")[0], f"--image {path}")
    return data, path.name


PHANTOM = "phantom.png"  # the image default_image makes when the real data is missing


def default_image() -> tuple[bytes, str]:
    """A real Val X-ray when the data is there, else a 256x256 phantom, as PNG bytes."""
    images = sorted((SHARED_DATA / "Infection Segmentation Data" / "Val" / "COVID-19" / "images").glob("*.png"))
    if images:
        return images[0].read_bytes(), images[0].name
    image = make_phantom(np.random.default_rng(0), 256, infected=True)[0]
    return cv2.imencode(".png", image)[1].tobytes(), PHANTOM


BENCH_OWNS = ("host", "port", "hydra.run.dir")  # a free local port, and a scratch run folder


def start_server(port: int, overrides: list[str], run_dir: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "covidseg.serve", f"port={port}", f"hydra.run.dir={run_dir}", *overrides]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_until_up(url: str, server: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:  # its own last line says why; a refused setting keeps exit code 2
            said = (server.stderr.read().strip().splitlines() or [""])[-1].removeprefix("error: ")
            say_error(f"the server stopped before answering (exit code {server.returncode}): {said}")
            sys.exit(2 if server.returncode == 2 else 1)
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.3)
    raise SystemExit(f"the server did not answer {url}/healthz within {timeout:.0f} s")


async def load(url: str, image: bytes, name: str, requests: int, concurrency: int, on_progress) -> dict:
    """``requests`` POSTs from ``concurrency`` clients; latency of each, errors by status."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(requests):
        queue.put_nowait(index)

    async def client(session: httpx.AsyncClient) -> None:
        while not queue.empty():
            index = queue.get_nowait()
            started = time.perf_counter()
            try:
                response = await session.post(f"{url}/api/predict", files={"file": (name, image, "image/png")})
                status = str(response.status_code)
            except httpx.HTTPError as error:
                status = type(error).__name__
            latencies.append(time.perf_counter() - started)
            if status != "200":
                errors[status] = errors.get(status, 0) + 1
            on_progress(index)

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=concurrency)) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    return {"seconds": time.perf_counter() - started, "latencies": latencies, "errors": errors}


def percentile(values: list[float], share: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[round(share * 100) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m covidseg.benchmarks.serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--requests", type=whole_number(2), default=200, help="timed requests (p50 needs two)")
    parser.add_argument("--concurrency", type=whole_number(1), default=16, help="concurrent clients")
    parser.add_argument("--warmup", type=whole_number(0), default=10, help="untimed requests first")
    parser.add_argument("--image", type=Path, help="the image to send (default: a Val X-ray or a phantom)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("outputs/bench_serve"),
        help="figures go to DIR/<date_time>",
    )
    parser.add_argument("overrides", nargs="*", help="overrides of conf/serve.yaml, e.g. ckpt_path=... workers=2")
    args = parser.parse_args()
    taken = [o for o in args.overrides if o.split("=")[0].lstrip("+~") in BENCH_OWNS]
    if taken:
        parser.error(f"{taken[0]!r}: the benchmark picks the server's {', '.join(BENCH_OWNS)} itself")
    with user_errors():
        image, name = read_image(args.image) if args.image else default_image()
        out = new_figures_folder(args.out)
    # a phantom is no chest X-ray: a model with an x-ray check would answer it 422 before the networks' work
    overrides = args.overrides + ["xray_check=false"] * (args.image is None and name == PHANTOM)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="covidseg-serve-bench-") as run_dir:
        server = start_server(port, overrides, Path(run_dir))
        try:
            wait_until_up(url, server)
            if args.warmup:
                asyncio.run(load(url, image, name, args.warmup, min(args.concurrency, args.warmup), lambda _: None))
            memory = {"after_warmup": rss_mib(server.pid)}
            half = args.requests // 2

            def on_progress(index: int) -> None:
                if index == half:
                    memory["half_way"] = rss_mib(server.pid)

            result = asyncio.run(load(url, image, name, args.requests, args.concurrency, on_progress))
            memory["end"] = rss_mib(server.pid)
        finally:
            server.terminate()
            server.wait(timeout=30)
    latencies = result["latencies"]
    figures = {
        "image": name,
        "image_bytes": len(image),
        "requests": args.requests,
        "concurrency": args.concurrency,
        "overrides": overrides,
        "cpu_count": os.cpu_count(),
        "throughput_per_s": args.requests / result["seconds"],
        "latency_p50_s": percentile(latencies, 0.50),
        "latency_p95_s": percentile(latencies, 0.95),
        "latency_max_s": max(latencies),
        "errors": result["errors"],
        "rss_mib": memory,
    }
    write_atomic(out / "serve_bench.json", json.dumps(figures, indent=2) + "\n")
    rss = {stage: values.get("VmRSS", float("nan")) for stage, values in memory.items()}
    print(
        f"| requests | clients | throughput | p50 | p95 | max | errors | RSS after warm-up / half / end | peak RSS |\n"
        f"|---:|---:|---:|---:|---:|---:|---:|---|---:|\n"
        f"| {args.requests} | {args.concurrency} | {figures['throughput_per_s']:.1f}/s "
        f"| {figures['latency_p50_s'] * 1000:.0f} ms | {figures['latency_p95_s'] * 1000:.0f} ms "
        f"| {figures['latency_max_s'] * 1000:.0f} ms | {sum(result['errors'].values())} "
        f"| {rss['after_warmup']:.0f} / {rss.get('half_way', float('nan')):.0f} / {rss['end']:.0f} MiB "
        f"| {memory['end'].get('VmHWM', float('nan')):.0f} MiB |"
    )


if __name__ == "__main__":
    main()
