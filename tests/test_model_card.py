"""Model cards: the shipped one is what the renderer makes of the shipped spec; export writes one."""

from __future__ import annotations

from pathlib import Path

import pytest

from covidseg.export import export
from covidseg.inference.loader import PRETRAINED_MODELS, read_model_file
from covidseg.reports.model_card import render_model_card


@pytest.mark.parametrize("name", sorted(PRETRAINED_MODELS))
def test_each_shipped_card_is_rendered_from_its_shipped_spec(name: str) -> None:
    path = PRETRAINED_MODELS[name]
    spec, _ = read_model_file(path)
    card = (path.parent / f"MODEL_CARD_{path.stem}.md").read_text()
    assert card == render_model_card(spec, path.stem, [path.name, path.with_suffix(".yaml").name])
    assert f"| Dice, per image (mean over COVID-19 images) | {spec.metrics['dice']} |" in card
    assert "Not a diagnostic device" in card and "CC BY-SA 4.0" in card


def test_export_writes_a_card_for_any_checkpoint(compose_cfg, trained_checkpoints: list[Path], tmp_path: Path) -> None:
    checkpoints = ",".join(str(path) for path in trained_checkpoints)
    cfg = compose_cfg("export", [f"ckpt_path=[{checkpoints}]", "format=safetensors", f"output={tmp_path / 'out'}"])
    path = export(cfg)
    card = (path.parent / "MODEL_CARD.md").read_text()
    assert card.startswith(f"# Model card: {trained_checkpoints[0].stem}\n")
    assert "An ensemble of 2 U-Net-family networks segmenting infection" in card
    assert "Files: `model.json`, `model.safetensors`, `model.yaml`." in card
    assert "presence head; runs at 64×64" in card and "threshold 0.5" in card
