"""Compare models evaluated on the same images: is B better than A, and by how much.

python -m covidseg.compare <eval run folder A> <eval run folder B> [C ...] [--resamples 2000] [--out DIR]

Each folder is an ``eval`` run (its per_image.csv and recorded config); the first is the reference.
Prints the table and writes comparison.md, comparison.csv and comparison.png to a new
``DIR/<date_time>`` folder (:mod:`covidseg.evaluation.comparison` says which statistics).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from covidseg.core.errors import user_errors, whole_number
from covidseg.core.files import printable
from covidseg.core.writing import new_figures_folder
from covidseg.evaluation.comparison import compare, read_eval_run
from covidseg.evaluation.intervals import check_resamples
from covidseg.reports.comparison import markdown, write_comparison


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m covidseg.compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", type=Path, nargs="+", help="eval run folders, the reference first")
    parser.add_argument("--resamples", type=whole_number(100), default=2000, help="bootstrap and permutation resamples")
    parser.add_argument("--seed", type=whole_number(0), default=42, help="seeds the resampling (reruns match)")
    parser.add_argument("--out", type=Path, default=Path("outputs/compare"), help="figures go to DIR/<date_time>")
    args = parser.parse_args()
    if len(args.runs) < 2:
        parser.error("give at least two eval run folders: the reference first, then the models to compare with it")
    with user_errors():
        check_resamples(args.resamples)
        runs = [read_eval_run(folder) for folder in args.runs]
        rows = compare(runs, args.resamples, args.seed)
        labels = {str(run.folder): chr(ord("A") + index) if index < 26 else str(index) for index, run in
                  enumerate(runs)}  # fmt: skip
        out = new_figures_folder(args.out)
        written = write_comparison(out, rows, labels, {str(run.folder): run.dice for run in runs})
    print(markdown(rows, labels))  # plain text: a Markdown table must not be wrapped to the terminal
    for model, label in labels.items():
        print(f"{label}: {printable(model)}")
    print(f"written: {', '.join(printable(path) for path in written)}")


if __name__ == "__main__":
    main()
