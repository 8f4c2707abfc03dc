"""The GPU check: one script that whoever has a GPU runs to fill docs/performance.md's GPU rows.

python -m covidseg.benchmarks.gpu_check [--steps 300] [--out outputs/gpu_check]   (make gpu-check)

It prints the environment (torch, CUDA, each GPU's name, memory and bf16 support), then runs, each as
the command a user types: ``experiment=best_gpu`` for ``--steps`` training steps in bf16 on one GPU
(its Val Dice after them and the wall time); the same on every visible GPU with ``trainer=ddp`` when
there are several; and ``eval`` of the shipped model on Val with ``trainer=gpu`` (its wall time and
metrics). Data: COVID-QU-Ex at ../shared/covid-qu-ex when it is there, else phantoms. The figures go
to ``--out/<date_time>/gpu_check.json``, each run's exit code and time printed as it ends. On a
machine without a CUDA GPU it prints what it would run and exits 0. It asserts nothing: the figures
are read off.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from covidseg.benchmarks.throughput import SHARED_DATA
from covidseg.core.errors import user_errors, whole_number
from covidseg.core.writing import new_figures_folder, write_atomic


def environment() -> dict:
    """torch, CUDA and every visible GPU."""
    gpus = [
        {
            "name": torch.cuda.get_device_name(index),
            "memory_gib": round(torch.cuda.get_device_properties(index).total_memory / 2**30, 1),
            "bf16": torch.cuda.is_bf16_supported(),
        }
        for index in range(torch.cuda.device_count())
    ]
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "gpus": gpus}


def data_overrides() -> list[str]:
    real = SHARED_DATA / "Infection Segmentation Data"
    return [f"data.root={SHARED_DATA}"] if real.is_dir() else ["data=synthetic", "data.synthetic.image_size=256"]


def commands(steps: int, gpus: int, run_dir: Path) -> dict[str, list[str]]:
    """The runs, by name, as command lines."""
    python = [sys.executable, "-m"]
    # --steps training steps: one epoch of that many batches, validated on all of Val
    train = ["experiment=best_gpu", "trainer.max_epochs=1", f"trainer.limit_train_batches={steps}", "test=false",
             "trainer.enable_progress_bar=false", *data_overrides()]  # fmt: skip
    runs = {"best_gpu, 1 GPU": [*python, "covidseg.train", *train, f"hydra.run.dir={run_dir / 'train_1'}"]}
    if gpus > 1:
        ddp = ["trainer=ddp", f"trainer.devices={gpus}", f"hydra.run.dir={run_dir / 'train_ddp'}"]
        runs[f"best_gpu, DDP on {gpus} GPUs"] = [*python, "covidseg.train", *train, *ddp]
    # eval keeps its loop in fp32 and runs the networks in bf16 with bf16=true
    gpu_eval = ["trainer=gpu", "trainer.precision=32-true", "bf16=true", "data.split=Val", *data_overrides()]
    runs["eval of the shipped model on Val"] = [*python, "covidseg.eval", "ckpt_path=pretrained", *gpu_eval,
                                                f"hydra.run.dir={run_dir / 'eval'}"]  # fmt: skip
    return runs


def run(command: list[str]) -> dict:
    """One command's wall time, exit code and the metrics it wrote."""
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    figures = {"command": " ".join(command[2:]), "exit_code": done.returncode,
               "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
    if done.returncode:
        figures["last_lines"] = done.stderr.strip().splitlines()[-5:]
    folder = Path(next(part.split("=", 1)[1] for part in command if part.startswith("hydra.run.dir=")))
    metrics = folder / "metrics.json"
    if metrics.is_file():
        figures["metrics"] = json.loads(metrics.read_text())
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m covidseg.benchmarks.gpu_check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--steps", type=whole_number(1), default=300, help="training steps of best_gpu")
    parser.add_argument("--out", type=Path, default=Path("outputs/gpu_check"), help="figures go to DIR/<date_time>")
    args = parser.parse_args()
    found = environment()
    print(json.dumps(found, indent=2))
    with user_errors():
        if not found["gpus"]:
            print("no CUDA GPU here: on one, this check would run")
            for name, command in commands(args.steps, 1, Path("<out>")).items():
                print(f"  {name}: {' '.join(command[2:])}")
            return
        out = new_figures_folder(args.out)
        figures = {"environment": found, "runs": {}}
        for name, command in commands(args.steps, len(found["gpus"]), out).items():
            figures["runs"][name] = run(name, command, out)
            print(
                f"{name}: exit {figures['runs'][name]['exit_code']}, {figures['runs'][name]['seconds']} s", flush=True
            )
        write_atomic(out / "gpu_check.json", json.dumps(figures, indent=2) + "\n")
    print(f"written: {out / 'gpu_check.json'}")


if __name__ == "__main__":
    main()
