"""Render a run's learning curves from its TensorBoard events, and its score by wall time.

python -m covidseg.learning_curves <run folder>   (learning_curves.png and val_dice_by_time.csv)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from covidseg.core.errors import user_errors
from covidseg.reports.learning_curves import learning_curves, read_scalars, run_started, score_by_time


def main() -> None:
    parser = argparse.ArgumentParser(description="Render a run's learning curves from its TensorBoard events.")
    parser.add_argument("run_dir", type=Path, help="a run folder under outputs/")
    run_dir = parser.parse_args().run_dir
    with user_errors():
        started = run_started(run_dir)  # a covidseg run folder, checked before anything is written into it
        series = read_scalars(run_dir)  # the event files are read once for both outputs
        print(learning_curves(run_dir, series))
        print(score_by_time(run_dir, series=series, started=started))


if __name__ == "__main__":
    main()
