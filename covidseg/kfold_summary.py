"""Summarise a multirun: mean, standard deviation and range of each metric across its k folds or seeds.

python -m covidseg.train -m data.num_folds=5 data.fold=0,1,2,3,4   (or: -m seed=1,2,3)
python -m covidseg.kfold_summary outputs/train/multiruns/<date>
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from covidseg.core.errors import user_errors
from covidseg.core.writing import refuse_unless_ours, write_atomic
from covidseg.reports.kfold_summary import MARKDOWN_HEADER, markdown, summarise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("multirun_dir", type=Path)
    parser.add_argument("--allow-missing-folds", action="store_true", help="summarise the folds that finished")
    arguments = parser.parse_args()
    folder = arguments.multirun_dir
    with user_errors():
        summary = summarise(folder, arguments.allow_missing_folds)
        purpose = "write the summary"
        refuse_unless_ours(
            folder / "kfold_summary.json", purpose, lambda head: head.startswith(b"{") and b'"mean": ' in head
        )
        refuse_unless_ours(folder / "kfold_summary.md", purpose, lambda head: head.startswith(MARKDOWN_HEADER.encode()))
        write_atomic(folder / "kfold_summary.json", json.dumps(summary, indent=2) + "\n")
        write_atomic(folder / "kfold_summary.md", markdown(summary))
    print(markdown(summary), end="")
    print(f"written: {folder / 'kfold_summary.json'}, {folder / 'kfold_summary.md'}")


if __name__ == "__main__":
    main()
