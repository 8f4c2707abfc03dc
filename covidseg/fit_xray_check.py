"""Give a model its "does this look like a chest X-ray?" check: fit on Train, measure on Val.

python -m covidseg.fit_xray_check ckpt_path=<ckpt|pretrained|list> data.root=<COVID-QU-Ex> [components=16]

The first network's encoder summary (:mod:`covidseg.inference.xray_check`) of every Train X-ray of
every class is computed once. ``fit_share`` of each class (seeded) fits the reference; the rest is held
out, and the threshold is the highest of the classes' ``1 - refuse_share`` quantiles of held-out
scores, so about ``refuse_share`` of unseen X-rays are refused. Val (every class) and pictures that are
not X-rays (:mod:`covidseg.evaluation.not_xrays`) are then scored with the reference as it is
stored (fp16), and the refusal rates printed and written to ``xray_check.json``. The output is the
model with its check: ``model.safetensors`` + ``model.yaml`` (what ``ckpt_path`` accepts) in the
run folder. Test stays held back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from pydantic import Field
from rich.console import Console
from rich.table import Table

from covidseg.core.config import CONF_DIR, check_output_folder
from covidseg.core.errors import ConfigError, DataError, hydra_errors_in_one_line, user_errors
from covidseg.core.framework_noise import quiet_framework_noise
from covidseg.core.images import resize_image
from covidseg.core.run_files import write_run_info
from covidseg.core.validation import CheckedSettings, check_command_keys
from covidseg.core.writing import write_atomic
from covidseg.data.decode import decode_samples
from covidseg.data.index import index_split
from covidseg.evaluation.not_xrays import generated_pictures, packaged_pictures
from covidseg.evaluation.test_loop import load_for_data
from covidseg.inference.exporters import export_safetensors, round_to_stored_precision
from covidseg.inference.loader import LoadedModel
from covidseg.inference.model_spec import XrayCheckSpec, parse_spec
from covidseg.inference.xray_check import XrayCheck, fit_xray_check

BATCH = 32


class FitSettings(CheckedSettings):
    components: int = Field(ge=1, le=1000)
    fit_share: float = Field(gt=0, lt=1)
    refuse_share: float = Field(gt=0, lt=0.5)


def summaries(loaded: LoadedModel, images: np.ndarray) -> torch.Tensor:
    """The first network's encoder summaries (N, D) of uint8 images (N, S, S), in batches."""
    network, bf16 = loaded.predictor.networks[0].eval(), loaded.predictor.bf16
    parts = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for start in range(0, len(images), BATCH):
            batch = torch.from_numpy(np.asarray(images[start : start + BATCH], np.float32) / 255)[:, None]
            parts.append(network.forward_with_summary(batch)[2].float())
    return torch.cat(parts)


def split_images(cfg: DictConfig, datamodule: Any, split: str) -> dict[str, np.ndarray]:
    """Decoded images of every class of ``split``, at the model's side (the decode cache is used)."""
    found = {}
    for label in datamodule.classes:
        samples = index_split(datamodule.root, split, [label], datamodule.targets)
        if samples:
            found[label], _ = decode_samples(samples, datamodule.image_size, datamodule.cache_dir)
    if not found:
        raise DataError(f"data.root={cfg.data.root!r} holds no {split} X-rays of {datamodule.classes}")
    return found


def rates(scores: dict[str, torch.Tensor], threshold: float) -> dict[str, dict[str, float]]:
    return {
        name: {"images": len(value), "refused": int((value > threshold).sum()),
               "refused_share": round(float((value > threshold).float().mean()), 4)}
        for name, value in scores.items()
    }  # fmt: skip


def fit(cfg: DictConfig) -> dict[str, Any]:
    check_command_keys(cfg, FitSettings)
    loaded, datamodule = load_for_data(cfg)
    round_to_stored_precision(loaded.predictor)  # the networks as the written file holds them, so it scores as measured
    datamodule.prepare_data()  # phantoms (data=synthetic) are written first
    side = loaded.spec.image_size
    pictures = generated_pictures(int(cfg.seed)) | packaged_pictures()  # first: a damaged one is said at once
    train = {label: summaries(loaded, images) for label, images in split_images(cfg, datamodule, "Train").items()}
    generator = torch.Generator().manual_seed(int(cfg.seed))
    fitted, held_out = [], {}
    for label, values in train.items():
        order = torch.randperm(len(values), generator=generator)
        cut = int(round(cfg.fit_share * len(values)))
        if cut < 1 or cut >= len(values):
            raise ConfigError(f"fit_share={cfg.fit_share}: leaves no {label} Train image to fit or to hold out")
        fitted.append(values[order[:cut]])
        held_out[label] = values[order[cut:]]
    reference = torch.cat(fitted)
    if not cfg.components < min(reference.shape):
        raise ConfigError(f"components={cfg.components}: expected fewer than {min(reference.shape)} (images, features)")
    check: XrayCheck = fit_xray_check(reference, cfg.components).half().float()  # as stored in the file
    held_out_scores = {label: check(values) for label, values in held_out.items()}
    threshold = max(float(torch.quantile(values, 1 - cfg.refuse_share)) for values in held_out_scores.values())
    val = {label: check(summaries(loaded, images)) for label, images in split_images(cfg, datamodule, "Val").items()}
    resized = np.stack([resize_image(picture, side) for picture in pictures.values()])
    picture_scores = check(summaries(loaded, resized))
    result = {
        "ckpt_path": loaded.description,
        "components": cfg.components,
        "reference_images": len(reference),
        "threshold": round(threshold, 4),
        "held_out_train": rates(held_out_scores, threshold),
        "val": rates(val, threshold),
        "not_xrays": rates({"all": picture_scores}, threshold)["all"],
        "not_xray_scores": {name: round(float(score), 3) for name, score in zip(pictures, picture_scores, strict=True)},
    }
    spec_data = loaded.spec.without_int8().to_plain()  # int8 ranges were measured on the graph without this check
    spec_data["metrics"] |= {
        "xray_check_val_refused": ", ".join(
            f"{label} {row['refused']} of {row['images']}" for label, row in result["val"].items()
        ),
        "xray_check_not_xrays_refused": f"{result['not_xrays']['refused']} of {result['not_xrays']['images']}",
    }
    spec_data |= {
        "xray_check": XrayCheckSpec(
            feature_count=reference.shape[1],
            components=cfg.components,
            threshold=round(threshold, 4),
            reference=f"{len(reference)} Train X-rays of {', '.join(train)}; threshold: the {1 - cfg.refuse_share:.1%} "
            "quantile of held-out Train X-rays' scores, in the class where it is highest",
        ).model_dump()
    }
    loaded.predictor.xray_check = check
    output = Path(cfg.paths.output_dir)
    write_run_info(output)
    export_safetensors(LoadedModel(loaded.predictor, parse_spec(spec_data, "the fitted check"), loaded.paths),
                       output / "model.safetensors")  # fmt: skip
    write_atomic(output / "xray_check.json", json.dumps(result, indent=2) + "\n")
    print_result(result, output)
    return result


def print_result(result: dict[str, Any], output: Path) -> None:
    table = Table(title=f"x-ray check, threshold {result['threshold']:.2f}: {result['ckpt_path']}")
    for column in ("X-rays", "images", "refused"):
        table.add_column(column, justify="right")
    for group in ("held_out_train", "val"):
        for label, row in result[group].items():
            table.add_row(f"{group} {label}", str(row["images"]), f"{row['refused_share']:.1%} ({row['refused']})")
    row = result["not_xrays"]
    table.add_row(
        "not X-rays (drawn, photographs)", str(row["images"]), f"{row['refused_share']:.1%} ({row['refused']})"
    )
    console = Console()
    console.print(table)
    console.print(f"the model with its check: {output / 'model.safetensors'}", markup=False, highlight=False)


@hydra_errors_in_one_line
@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="fit_xray_check")
def main(cfg: DictConfig) -> None:
    quiet_framework_noise()
    with user_errors():
        check_output_folder(cfg)
        fit(cfg)


if __name__ == "__main__":
    main()
