"""Distillation, step one: a teacher's probabilities on every training image, for a student to learn.

python -m covidseg.distill ckpt_path=<teacher> [flip_tta=true] data.root=...
python -m covidseg.train experiment=best_cpu data.teacher_targets=<its teacher_targets.npz> model.distill_weight=1.0

The teacher is anything the Predictor loads (one model, an ensemble, flip TTA); it runs once over
the Train images of ``data.classes`` (the student's classes), unaugmented, and its ungated
probabilities of the primary target are stored as uint8. Running it once here instead of in every
training step keeps the student's steps as cheap as without a teacher; the price is that the
targets are augmented with the masks rather than predicted on each augmented image.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig, open_dict
from rich.progress import track

from covidseg.core.config import CONF_DIR, check_output_folder
from covidseg.core.errors import hydra_errors_in_one_line, user_errors
from covidseg.core.framework_noise import quiet_framework_noise
from covidseg.core.run_files import write_run_info
from covidseg.data.teacher_targets import save_teacher_targets
from covidseg.evaluation.test_loop import load_for_data


def write_teacher_targets(cfg: DictConfig) -> Path:
    """Run the teacher over the training images; returns the ``teacher_targets.npz`` written."""
    with open_dict(cfg):
        cfg.data.split = "Train"
        cfg.data.eval_classes = list(cfg.data.classes)
        cfg.presence_threshold = None  # the student learns the teacher's masks; its own head learns presence
    loaded, datamodule = load_for_data(cfg)
    output_dir = Path(cfg.paths.output_dir)
    write_run_info(output_dir)
    primary = loaded.predictor.targets.index(loaded.predictor.primary_target)
    names: list[str] = []
    probabilities: list[np.ndarray] = []
    batches = datamodule.test_dataloader()
    for batch in track(batches, description=f"teacher: {loaded.description}", total=len(batches)):
        probability = loaded.predictor.predict(batch["image"]).probability[:, primary]
        probabilities.append(probability.numpy())  # the Predictor's probabilities are fp32
        names += batch["name"]
    path = output_dir / "teacher_targets.npz"
    save_teacher_targets(path, names, np.concatenate(probabilities))
    print(f"teacher targets for {len(names)} training images: {path}")
    print(f"train a student: python -m covidseg.train ... data.teacher_targets={path} model.distill_weight=1.0")
    return path


@hydra_errors_in_one_line
@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="distill")
def main(cfg: DictConfig) -> None:
    quiet_framework_noise()
    with user_errors():
        check_output_folder(cfg)  # this run's own folder, before anything is written
        write_teacher_targets(cfg)


if __name__ == "__main__":
    main()
