"""Benchmark of ``predict`` as users run it: a folder of X-rays in, masks, overlays and CSV out.

python -m covidseg.benchmarks.predict [--input FOLDER] [--rounds 3] [--out DIR] [predict overrides]

Each round runs :func:`covidseg.predict.predict` once per backend and precision (torch fp32 and bf16,
ONNX Runtime fp32, OpenVINO fp32, bf16 and int8, ``backend=auto`` (the default), and OpenVINO over 2
processes with ``trainer=ddp_cpu``; ``--variants`` picks), in-process,
so the figures leave out the interpreter's start-up but count everything ``predict`` does: finding
the files, loading the model, reading, resizing, the model, the overlays and writing the PNGs and
the CSV. The input defaults to the Val COVID-19 X-rays of ../shared/covid-qu-ex when they are
there, else 64 synthetic phantoms; int8 is calibrated (once, before the rounds, as a user's first run
does) on the Train X-rays there, else on the input. It asserts nothing: targets are read off the table.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from covidseg.benchmarks.throughput import SHARED_DATA, spread
from covidseg.core.config import compose_config
from covidseg.core.errors import DataError, user_errors, whole_number
from covidseg.core.files import printable
from covidseg.core.images import find_inputs
from covidseg.core.writing import new_figures_folder, write_atomic
from covidseg.data.synthetic import make_phantom
from covidseg.inference.prediction_loop import WRITER_STAGE
from covidseg.inference.segment import load_configured_backend
from covidseg.predict import predict

VARIANTS = {  # backend and precision of each timed predict; the first is what the others are compared with
    "torch fp32": ["backend=torch", "bf16=false"],
    "torch bf16": ["backend=torch", "bf16=true"],
    "onnxruntime fp32": ["backend=onnx", "bf16=false"],
    "openvino fp32": ["backend=openvino", "bf16=false"],
    "openvino bf16": ["backend=openvino", "bf16=true"],
    "openvino int8": ["backend=openvino_int8", "bf16=true"],
    "auto": ["backend=auto"],  # predict's default: what a user gets
    # the images shared out over processes, each with its share of the cores (its stages are not timed here)
    "openvino bf16 2 processes": ["backend=openvino", "bf16=true", "trainer=ddp_cpu", "trainer.devices=2"],
    "openvino int8 2 processes": ["backend=openvino_int8", "bf16=true", "trainer=ddp_cpu", "trainer.devices=2"],
}
INT8 = [name for name, settings in VARIANTS.items() if "backend=openvino_int8" in settings]


PHANTOMS = "phantoms"  # the folder default_input writes when the real data is missing


def default_input(scratch: Path) -> Path:
    """The Val COVID-19 images when the real data is there, else 64 phantoms written to ``scratch``."""
    real = SHARED_DATA / "Infection Segmentation Data" / "Val" / "COVID-19" / "images"
    if real.is_dir():
        return real
    folder = scratch / PHANTOMS
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(64):
        cv2.imwrite(str(folder / f"{index:03d}.png"), make_phantom(rng, 256, infected=True)[0])
    return folder


def default_calibration(input_folder: Path) -> str:
    """What int8 is calibrated on: the Train split's X-rays when the real data is there, else the input."""
    train = SHARED_DATA / "Infection Segmentation Data" / "Train"
    return f"{train}/*/images/*.png" if train.is_dir() else str(input_folder)


def run(
    input_folder: Path, rounds: int, overrides: list[str], scratch: Path, variants: list[str] | None = None
) -> dict:
    """Images per second of whole ``predict`` calls, per backend and precision, in interleaved rounds."""
    variants = list(VARIANTS) if variants is None else variants
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    stages: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    images = 0
    model = [] if any(o.startswith("ckpt_path=") for o in overrides) else ["ckpt_path=pretrained"]
    find_inputs(str(input_folder))  # an input without images is refused before int8 calibrates on it
    settings = {name: list(VARIANTS[name]) for name in variants}
    int8 = [name for name in INT8 if name in settings]
    for name in int8:
        if not any(o.startswith("int8_calibration=") for o in overrides):
            settings[name] += [f"int8_calibration={default_calibration(input_folder)}"]
    for name in [*int8[:1], *(["auto"] if "auto" in settings else [])]:  # int8 graphs made once, untimed
        base = [*model, *overrides, *settings[name], f"input={input_folder}", f"output={scratch / 'warm-up'}"]
        load_configured_backend(
            compose_config("predict", base, output_dir=scratch / "warm-up", log_dir=scratch / "logs")
        )
    for round_index in range(rounds):
        for name in variants:
            output = scratch / f"{name.replace(' ', '_')}_{round_index}"
            base = [*model, *overrides, *settings[name], f"input={input_folder}", f"output={output}"]
            cfg = compose_config("predict", base, output_dir=output, log_dir=scratch / "logs")
            started = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                done = predict(cfg)  # its progress bar and summary line kept off the table
            seconds[name].append(time.perf_counter() - started)
            images = len(done.rows)
            stages[name].append(
                {
                    **done.stage_seconds,
                    "other (files, model loading)": seconds[name][-1]
                    - sum(value for stage, value in done.stage_seconds.items() if stage != WRITER_STAGE),
                }
            )
            if not images:
                raise DataError(f"input {printable(input_folder)!r}: predict could read none of its images")
    per_second = {name: spread([images / value for value in values]) for name, values in seconds.items()}
    return {
        "images": images,
        "rounds": rounds,
        "overrides": overrides,
        "images_per_second": per_second,
        "speedup": {name: figure["median"] / per_second[variants[0]]["median"] for name, figure in per_second.items()},
        "milliseconds_per_image": {  # per stage, the median over rounds
            name: {stage: 1000 * float(np.median([r[stage] for r in rounds_of])) / images for stage in rounds_of[0]}
            for name, rounds_of in stages.items()
        },
    }


def markdown(figures: dict) -> str:
    lines = [
        f"predict, {figures['images']} images, {figures['rounds']} interleaved rounds",
        "",
        "| backend, precision | images/s (median) | min | max | speed-up |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, figure in figures["images_per_second"].items():
        lines.append(
            f"| {name} | {figure['median']:.1f} | {figure['min']:.1f} | {figure['max']:.1f} | "
            f"x{figures['speedup'][name]:.2f} |"
        )
    stage_names = list(next(iter(figures["milliseconds_per_image"].values())))
    lines += ["", "milliseconds per image, by stage (median over rounds):", "",
              f"| backend, precision | {' | '.join(stage_names)} |", "|---|" + "---:|" * len(stage_names)]  # fmt: skip
    for name, by_stage in figures["milliseconds_per_image"].items():
        lines.append(f"| {name} | " + " | ".join(f"{by_stage[stage]:.1f}" for stage in stage_names) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m covidseg.benchmarks.predict",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--input", type=Path, help="a folder of X-rays (default: Val COVID-19, else phantoms)")
    parser.add_argument("--rounds", type=whole_number(1), default=3, help="interleaved rounds of fp32 and bf16")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_predict"), help="figures go to DIR/<date_time>")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        default=list(VARIANTS),
        metavar="VARIANT",
        help=f"which to time, the first being the reference: {', '.join(repr(name) for name in VARIANTS)}",
    )
    parser.add_argument("overrides", nargs="*", help="predict overrides, e.g. ckpt_path=... flip_tta=false")
    args = parser.parse_args()
    logging.getLogger("covidseg").setLevel(logging.WARNING)
    with user_errors(), tempfile.TemporaryDirectory(prefix="covidseg-predict-bench-") as scratch:
        out = new_figures_folder(args.out)
        input_folder = args.input or default_input(Path(scratch))
        # phantoms are no chest X-rays: a model with an x-ray check would refuse them all untimed
        overrides = args.overrides + ["xray_check=false"] * (args.input is None and input_folder.name == PHANTOMS)
        figures = run(input_folder, args.rounds, overrides, Path(scratch), args.variants)
    write_atomic(out / "predict_bench.json", json.dumps(figures, indent=2) + "\n")
    print(markdown(figures))
    print(f"written: {out / 'predict_bench.json'}")


if __name__ == "__main__":
    main()
