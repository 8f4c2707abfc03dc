"""Shared fixtures: configs composed as the entry points compose them, shrunk for speed."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import absl.logging
import numpy as np
import pytest

from covidseg.core.config import compose_config

# OpenVINO imports absl.logging, whose handler keeps the sys.stderr of that moment; a later
# logging.config.dictConfig (each Hydra command run in-process) closes every handler, and with it
# the stream of a test that captured stderr, which breaks capture for every test after it. The
# process's own stderr is one absl never closes.
absl.logging.get_absl_handler().python_handler.stream = sys.__stderr__

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "covid-qu-ex"

# A tiny U-Net on tiny phantoms: whole training runs take seconds.
FAST = [
    "data=synthetic",
    "data.image_size=64",
    "data.synthetic.image_size=64",
    "data.synthetic.counts={Train: 8, Val: 4, Test: 4}",
    "data.batch_size=4",
    "model.net.base_width=4",
    "trainer.max_epochs=1",
    "trainer.precision=32-true",  # bf16 gains nothing on a tiny network; test_train checks bf16 runs
    "trainer.enable_progress_bar=false",
    "~callbacks.model_summary",
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the session, so synthetic phantoms are written once."""
    return tmp_path_factory.mktemp("cache")


def _paths(out_dir: Path, cache_dir: Path) -> dict[str, Path]:
    """Run outputs under ``out_dir``, caches in the session's cache."""
    return {"log_dir": out_dir / "outputs", "output_dir": out_dir / "outputs" / "run", "cache_dir": cache_dir}


@pytest.fixture
def compose_cfg(tmp_path: Path, cache_dir: Path):
    """``compose_cfg(name, overrides)`` -> a config whose outputs go to ``tmp_path``."""
    return lambda config_name="train", overrides=None: compose_config(
        config_name, overrides or [], **_paths(tmp_path, cache_dir)
    )


def train_tiny(out_dir: Path, cache_dir: Path, *overrides: str) -> Path:
    """Train the tiny U-Net for one epoch and return its best checkpoint."""
    from covidseg.inference.loader import best_checkpoint
    from covidseg.train import train

    cfg = compose_config("train", [*FAST, "test=false", "logger=csv", *overrides], **_paths(out_dir, cache_dir))
    train(cfg)
    return best_checkpoint(out_dir / "outputs" / "run")


@pytest.fixture(scope="session")
def trained_checkpoints(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> list[Path]:
    """Two tiny trained models with a presence head (seeds 1 and 2), shared by the whole session."""
    return [
        train_tiny(tmp_path_factory.mktemp(f"trained{seed}"), cache_dir, f"seed={seed}", "model.presence_weight=0.5")
        for seed in (1, 2)
    ]


@pytest.fixture
def real_data() -> Path:
    if not (REAL_DATA / "Infection Segmentation Data").is_dir():
        pytest.skip(f"real COVID-QU-Ex data not found at {REAL_DATA}")
    return REAL_DATA


@pytest.fixture(scope="session")
def xray() -> np.ndarray:
    """A 300x280 phantom with a lesion: not the model's side, so answers must come back at this size."""
    from covidseg.data.synthetic import make_phantom

    image = make_phantom(np.random.default_rng(2), 300, infected=True)[0]
    return np.ascontiguousarray(image[:, 10:290])


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``python -m covidseg.serve`` (the shipped model) as a user starts it, on a free port of 127.0.0.1;
    without its x-ray check, since the tests' phantoms are no X-rays (the check has tests of its own)."""
    from covidseg.benchmarks.serve import free_port, start_server, wait_until_up

    port = free_port()
    process = start_server(port, ["xray_check=false"], tmp_path_factory.mktemp("serve"))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, process)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
