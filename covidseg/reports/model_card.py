"""A model card (Markdown) from a model spec: what the model is, what it was trained and measured
on, what it is for and where it fails. ``export`` writes one beside every export; the shipped
model's ``covidseg/pretrained/MODEL_CARD.md`` is this function's output for its spec (a test keeps
the two equal), so a card never says more than its model file records.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from covidseg.inference.model_spec import ModelSpec

DATASET = (
    "COVID-QU-Ex, *Infection Segmentation Data* (Tahir et al., 2021; "
    "[Kaggle](https://www.kaggle.com/datasets/anasmohammedtahir/covidqu), CC BY-SA 4.0): "
    "256×256 8-bit chest X-rays with infection and lung masks; Train 1864 / Val 466 / Test 583 "
    "COVID-19 images, and Non-COVID and Normal images (932 / 233 of each in Train / Val) whose "
    "infection masks are empty"
)
METRIC_NAMES = {
    "dice": "Dice, per image (mean over COVID-19 images)",
    "iou": "IoU, per image",
    "dice_pooled": "Dice, pooled over all pixels",
    "iou_pooled": "IoU, pooled",
    "healthy_val_images_below_1pct_area": "healthy Val images (Non-COVID, Normal) predicted below 1 % infected area",
    # lung + infection models: the lungs and severity against the ground-truth masks (docs/user_guide.md)
    "dice_lung": "lung Dice, per image",
    "dice_lung_healthy": "lung Dice, per image, healthy Val images (Non-COVID, Normal)",
    "severity_percent_infected_mae": "percent of both lungs infected: mean absolute error (points)",
    "severity_percent_infected_bias": "percent of both lungs infected: Bland-Altman bias, predicted - true (points)",
    "severity_zone_score_kappa": "zone score (0-6): quadratic-weighted kappa",
    "severity_zone_score_within_one": "zone score (0-6): share within one of the truth",
    # the int8 model (OpenVINO) the file's int8 ranges make, at its own presence gate
    "int8_dice": "int8: Dice, per image (mean over COVID-19 images)",
    "int8_healthy_val_images_below_1pct_area": "int8: healthy Val images predicted below 1 % infected area",
}
INTENDED_USE = """\
- Research on segmenting COVID-19 infection in chest X-rays: comparing methods, measuring the
  extent of opacities in a study, teaching.
- **Not a diagnostic device.** It has not been cleared by any regulator, tested prospectively or
  validated on data from other hospitals; do not use it to decide anything about a patient."""
LIMITS = """\
- Trained and validated on COVID-QU-Ex only (256×256 frontal views, as the dataset publishes
  them); other scanners, paediatric images, lateral views, post-processing or devices in the image
  are outside what it was measured on.
- Infected area is the share of the *image* (or of the predicted lungs, for lung models); left and
  right in severity are the patient's, assuming a standard PA/AP view (patient's left on the image's
  right).
- Small lesions are the weak spot: per-image Dice falls for lesions of a few percent of the image,
  and an image with a presence probability below the presence threshold gets an empty mask.
- The metrics above are on Val, which also chose the thresholds; the held-out Test split was not
  used, so expect them to be optimistic."""


def _networks(spec: ModelSpec) -> str:
    lines = []
    for network in spec.networks:
        options = ", ".join(f"{key} {value}" for key, value in network.options.items())
        side = network.input_size or spec.image_size
        head = ", presence head" if network.presence_head else ""
        lines.append(f"- `{network.name}` ({options}){head}; runs at {side}×{side}")
    return "\n".join(lines)


def _refusals(spec: ModelSpec) -> str:
    check = spec.xray_check
    if check is None:
        return (
            "This model has no x-ray check: it answers every picture, chest X-ray or not. Give it one with "
            "`python -m covidseg.fit_xray_check`."
        )
    measured = ""
    if "xray_check_val_refused" in spec.metrics:
        measured = (
            f" Measured: Val X-rays refused: {spec.metrics['xray_check_val_refused']}; pictures "
            f"that are not X-rays (drawn by covidseg, and the sample pictures that Matplotlib, scikit-learn and "
            f"scikit-image ship, each once: `covidseg.evaluation.not_xrays`) refused: "
            f"{spec.metrics.get('xray_check_not_xrays_refused', 'not recorded')}."
        )
    return (
        f"`predict` and `serve` refuse a picture that does not look like the chest X-rays the model learnt from: "
        f"its x-ray score (how far the first network's encoder summary lies outside the first {check.components} "
        f"principal components of real X-rays') is above {check.threshold}. Reference: {check.reference}."
        f"{measured} `xray_check=false` answers every picture."
    )


def _int8(spec: ModelSpec) -> str:
    int8 = spec.int8
    if int8 is None:
        return ""
    gate = "" if int8.presence_threshold is None else f", presence threshold {int8.presence_threshold}"
    return (
        f"- int8 (OpenVINO{gate}): `backend=auto` runs it on CPUs with int8 dot products (VNNI or AMX); the ranges "
        f"of its {int8.quantizers} quantizers were calibrated on {int8.calibration}\n"
    )


def _metrics(metrics: dict[str, Any]) -> str:
    rows = [(METRIC_NAMES[key], metrics[key]) for key in METRIC_NAMES if key in metrics]
    if not rows:
        return "No metrics are recorded in this model file: measure it with `python -m covidseg.eval`."
    where = f"split {metrics.get('split', '?')}, class {metrics.get('classes', '?')}"
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return f"Measured on {where}.\n\n| metric | value |\n|---|---:|\n{table}"


def render_model_card(spec: ModelSpec, name: str, files: Sequence[str]) -> str:
    """The card's Markdown for a model spec and its file names."""
    inference = spec.inference
    settings = f"threshold {inference.threshold}"
    if inference.presence_threshold is not None:
        settings += f", presence threshold {inference.presence_threshold}"
    settings += f", flip TTA {'on' if inference.flip_tta else 'off'}"
    if inference.min_region_share:
        settings += f", regions under {100 * inference.min_region_share:g} % of the image dropped (not the largest)"
    if "lung" in spec.targets and "infection" in spec.targets:
        settings += f", infection kept inside the lungs {'on' if inference.restrict_to_lungs else 'off'}"
    classes = ", ".join(spec.data.classes) or "not recorded"
    recipe = spec.metrics.get("recipe", "not recorded in this model file")
    count = len(spec.networks)
    what = f"An ensemble of {count} U-Net-family networks" if count > 1 else "A U-Net-family network"
    outputs = ", ".join(spec.targets) + (", and a presence probability" if spec.has_presence else "")
    return f"""# Model card: {name}

{what} segmenting {" and ".join(spec.targets)} in chest X-rays, made with covidseg.
Files: {", ".join(f"`{file}`" for file in files)}. Load with
`ckpt_path=<file>` in `covidseg.eval`, `predict`, `serve` or `export`; the weights are plain tensors
and the model spec is plain data (nothing in the files chooses code to run).

## Model

{_networks(spec)}
- Input: one grayscale image resized to {spec.image_size}×{spec.image_size}, divided by 255
- Output: a probability per pixel for {outputs}
- Inference settings: {settings}
{_int8(spec)}
## Training

- Data: {DATASET}
- Classes trained on: {classes}
- Recipe: {recipe}

## Metrics

{_metrics(spec.metrics)}

## Pictures it refuses

{_refusals(spec)}

## Intended use

{INTENDED_USE}

## Known limits

{LIMITS}
"""
