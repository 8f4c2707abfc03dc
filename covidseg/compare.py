"""Compare models evaluated on the same images: is B better than A, and by how much.

python -m covidseg.compare <A> <B> [C ...] [--eval KEY=VALUE ...] [--resamples 2000] [--out DIR]

Each of A, B, ... is an ``eval`` run folder (its per_image.csv and recorded config) or a model
(anything ``ckpt_path`` takes: a checkpoint, ``pretrained``, ``[a.ckpt,b.ckpt]``, a k-fold folder),
which is first evaluated by ``python -m covidseg.eval ckpt_path=<model> <--eval overrides>`` into
``DIR/<date_time>/evals/<label>``, so that it is scored exactly as eval scores it; the first is
the reference. Prints the table and writes comparison.md, comparison.csv and comparison.png to that
new folder (:mod:`covidseg.evaluation.comparison` says which statistics).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from covidseg.core.errors import ConfigError, DataError, user_errors, whole_number
from covidseg.core.files import printable
from covidseg.core.writing import new_figures_folder
from covidseg.evaluation.comparison import compare, infected_apart, read_eval_run
from covidseg.evaluation.intervals import check_resamples
from covidseg.reports.comparison import markdown, write_comparison


def label_of(index: int) -> str:
    return chr(ord("A") + index) if index < 26 else str(index)


def is_eval_run(folder: Path) -> bool:
    return (folder / "per_image.csv").is_file()


def evaluate_model(model: str, overrides: list[str], folder: Path) -> Path:
    """``python -m covidseg.eval ckpt_path=<model> <overrides>`` into ``folder`` (its own process, as
    a user runs it: the recorded config says which images it scored); its error in one line. A model
    that names a file or folder, and the folder, reach eval through the environment, so that no
    character of a path (``=``, brackets, quotes, ``${``) is read as Hydra's syntax; anything else
    (``pretrained``, ``[a.ckpt,b.ckpt]``) is given as it is written."""
    keys = [(override, override.split("=")[0].lstrip("+~")) for override in overrides]
    taken = [override for override, key in keys if key in ("ckpt_path", "hydra") or key.startswith("hydra.")]
    if taken:
        raise ConfigError(
            f"--eval {taken[0]}: compare sets the model and eval's folder itself; give models as arguments"
        )
    environment = os.environ | {"COVIDSEG_COMPARE_RUN_DIR": str(folder)}
    if os.path.lexists(model):
        environment["COVIDSEG_COMPARE_MODEL"] = model
        named = "ckpt_path=${oc.env:COVIDSEG_COMPARE_MODEL}"
    else:
        named = f"ckpt_path={model}"
    command = [
        sys.executable,
        "-m",
        "covidseg.eval",
        named,
        *overrides,
        "hydra.run.dir=${oc.env:COVIDSEG_COMPARE_RUN_DIR}",
    ]
    print(f"evaluating {printable(model)} ...", flush=True)
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace",
                          env=environment)  # fmt: skip
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        raise DataError(f"eval of {printable(model)!r} failed (exit {done.returncode}): {(lines or ['?'])[-1][:300]}")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m covidseg.compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", help="eval run folders or models to evaluate, the reference first")
    example = "e.g. data.root=../shared/covid-qu-ex data.split=Val"
    parser.add_argument(
        "--eval", nargs="+", default=[], metavar="KEY=VALUE", help=f"eval overrides for models, {example}"
    )
    parser.add_argument("--resamples", type=whole_number(100), default=2000, help="bootstrap and permutation resamples")
    parser.add_argument("--seed", type=whole_number(0), default=42, help="seeds the resampling (reruns match)")
    parser.add_argument("--out", type=Path, default=Path("outputs/compare"), help="figures go to DIR/<date_time>")
    args = parser.parse_args()
    if len(args.runs) < 2:
        parser.error("give at least two eval run folders or models: the reference first, then those to compare with it")
    with user_errors():
        check_resamples(args.resamples)
        evaluated = {index for index, run in enumerate(args.runs) if not is_eval_run(Path(run))}
        # a new folder for the figures, made first when models are to be evaluated into it
        out = new_figures_folder(args.out) if evaluated else None
        folders = [
            evaluate_model(run, args.eval, out / "evals" / label_of(index)) if index in evaluated else Path(run)
            for index, run in enumerate(args.runs)
        ]
        runs = [read_eval_run(folder) for folder in folders]
        rows = compare(runs, args.resamples, args.seed)
        labels = {str(run.folder): label_of(index) for index, run in enumerate(runs)}
        out = out or new_figures_folder(args.out)
        sources = {str(folders[index]): args.runs[index] for index in evaluated}
        infected = infected_apart(runs[0])  # with healthy images scored too, the plot shows the infected ones
        shown = {str(run.folder): run.dice if infected is None else run.dice[infected] for run in runs}
        plotted = "per-image Dice" if infected is None else "per-image Dice, infected images"
        written = write_comparison(out, rows, labels, shown, sources, plotted)
    print(markdown(rows, labels))  # plain text: a Markdown table must not be wrapped to the terminal
    for index, (given, run) in enumerate(zip(args.runs, runs, strict=True)):
        into = f" (evaluated into {printable(run.folder)})" if index in evaluated else ""
        print(f"{label_of(index)}: {printable(given)}{into}; ran on {run.backend}")
    print(f"written: {', '.join(printable(path) for path in written)}")


if __name__ == "__main__":
    main()
