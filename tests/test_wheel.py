"""covidseg as a user installs a release: the sdist and wheel that ``python -m build`` makes carry
the configs, the shipped model, its card and the page, and every installed command works from an
empty folder, with no checkout and no editable install in sight."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import urllib.request
import venv
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from covidseg.benchmarks.serve import free_port, wait_until_up

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("train", "eval", "calibrate", "distill", "predict", "export", "serve", "fit-xray-check")
SHIPPED = (
    "covidseg/pretrained/best_cpu.safetensors",
    "covidseg/pretrained/best_cpu.yaml",
    "covidseg/pretrained/MODEL_CARD_best_cpu.md",
    "covidseg/pretrained/lung_infection.safetensors",
    "covidseg/pretrained/lung_infection.yaml",
    "covidseg/pretrained/MODEL_CARD_lung_infection.md",
    "covidseg/serving/web/index.html",
    "covidseg/serving/web/app.js",
    "covidseg/serving/web/app.css",
)


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``python -m build`` of the repository: an sdist, and a wheel built from that sdist."""
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(REPO)],
        check=True, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    return out


def run(command: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.mark.slow
def test_the_sdist_and_the_wheel_carry_every_module_the_configs_the_model_and_the_page(dist: Path) -> None:
    wheel_files = set(zipfile.ZipFile(next(dist.glob("covidseg-*.whl"))).namelist())
    modules = {str(path.relative_to(REPO)) for path in (REPO / "covidseg").rglob("*.py")}
    configs = {f"covidseg/{path.relative_to(REPO)}" for path in (REPO / "conf").rglob("*.yaml")}
    assert modules | configs | set(SHIPPED) <= wheel_files, sorted((modules | configs | set(SHIPPED)) - wheel_files)
    with tarfile.open(next(dist.glob("covidseg-*.tar.gz"))) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    assert {str(path.relative_to(REPO)) for path in (REPO / "conf").rglob("*.yaml")} <= names
    assert {"pyproject.toml", "README.md", "covidseg/pretrained/best_cpu.safetensors"} <= names


@pytest.mark.slow
def test_the_installed_wheel_trains_predicts_and_serves_from_an_empty_folder(dist: Path, tmp_path: Path) -> None:
    """A virtual environment that sees the installed dependencies (torch, Lightning ...) but holds
    covidseg only as the wheel; the commands run from an empty folder, where no ``conf/`` is, and
    every covidseg module they could import comes from the wheel, not from a checkout."""
    environment = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(environment)
    python = environment / "bin" / "python"
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env |= {"COVIDSEG_CACHE": str(tmp_path / "cache"), "PATH": f"{environment / 'bin'}:{env['PATH']}"}
    wheel = next(dist.glob("covidseg-*.whl"))
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-index", "--no-deps"]
    run([*pip, "--force-reinstall", str(wheel)], tmp_path, env)
    empty = tmp_path / "empty"
    empty.mkdir()

    names = sorted(".".join(path.relative_to(REPO).with_suffix("").parts) for path in (REPO / "covidseg").rglob("*.py"))
    names = [name.removesuffix(".__init__") for name in names]
    check = (
        "import importlib, sys; from covidseg.core.config import CONF_DIR; print(CONF_DIR)\n"
        "for name in sys.argv[1:]: print(importlib.import_module(name).__file__)"
    )
    where = run([str(python), "-c", check, *names], empty, env).stdout.split()
    packaged = environment / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    assert Path(where[0]) == packaged / "covidseg" / "conf", f"configs from {where[0]}"
    strays = [file for file in where[1:] if not Path(file).is_relative_to(packaged / "covidseg")]
    assert strays == [] and len(where) == len(names) + 1, f"modules not from the wheel: {strays}"
    # every console script's entry point, as the wheel declares it, prints its Hydra help from the wheel's
    # configs (in one process: eight interpreters cost 50 s; the scripts themselves run below)
    helps = (
        "import contextlib, io, json, sys\n"
        "from importlib.metadata import entry_points\n"
        "found = {}\n"
        "for point in entry_points(group='console_scripts'):\n"
        "    if point.name.startswith('covidseg-'):\n"
        "        sys.argv, said = [point.name, '--help'], io.StringIO()\n"
        "        with contextlib.redirect_stdout(said):\n"
        "            try:\n"
        "                point.load()()\n"
        "            except SystemExit as stop:\n"
        "                found[point.name] = [stop.code, '== Config ==' in said.getvalue()]\n"
        "print(json.dumps(found))"
    )
    found = json.loads(run([str(python), "-c", helps], empty, env).stdout.splitlines()[-1])
    assert {f"covidseg-{script}": [0, True] for script in SCRIPTS}.items() <= found.items(), found
    assert found["covidseg-compare"] == [0, False]  # argparse's help

    run(["covidseg-train", "experiment=quickstart", "trainer.max_epochs=1", "trainer.precision=32-true"], empty, env)
    assert list((empty / "outputs" / "quickstart" / "runs").glob("*/checkpoints/last.ckpt"))

    image = np.full((128, 128), 40, np.uint8)
    cv2.circle(image, (64, 64), 40, 200, -1)
    cv2.imwrite(str(empty / "xray.png"), image)
    # a drawn circle is no chest X-ray: the shipped model's check would refuse it (exit 3)
    run(
        ["covidseg-predict", "ckpt_path=pretrained", "input=xray.png", "output=predictions", "xray_check=false"],
        empty,
        env,
    )
    assert (empty / "predictions" / "xray.png.mask.png").is_file()
    assert (empty / "predictions" / "predictions.csv").read_text().splitlines()[1].startswith("xray.png,128,128,")

    port = free_port()
    server = subprocess.Popen(["covidseg-serve", "ckpt_path=pretrained", f"port={port}"], cwd=empty, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        wait_until_up(f"http://127.0.0.1:{port}", server)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/") as page:
            assert b"covidseg" in page.read()  # the page, from the wheel's serving/web
    finally:
        server.terminate()
        server.wait(timeout=30)
