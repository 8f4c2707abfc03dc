"""Recipe options: the efficient ResUNet, the presence head and gate, progressive resizing, and
thresholds chosen on Val by covidseg.calibrate."""

import csv
import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST
from torch.utils.flop_counter import FlopCounterMode

from covidseg import models
from covidseg.calibrate import Choice, calibrate, choose, score_choices
from covidseg.eval import evaluate
from covidseg.inference.loader import load_predictor
from covidseg.inference.model_spec import InferenceSettings
from covidseg.inference.predictor import Predictor
from covidseg.models import BCEDiceLoss, ResUNet, SegmentationModule, UNet
from covidseg.train import train
from covidseg.training.callbacks import ProgressiveResizing

NETS = ["UNet", "AttentionUNet", "UNetPlusPlus", "ResUNet"]


def _flops(net: torch.nn.Module, side: int = 256) -> int:
    with FlopCounterMode(display=False) as counter:
        net(torch.zeros(1, 1, side, side))
    return counter.get_total_flops()


def test_resunet_is_the_unets_size_at_a_quarter_of_its_flops() -> None:
    unet, resunet = UNet(), ResUNet()
    assert sum(p.numel() for p in resunet.parameters()) / 1e6 == pytest.approx(7.948, abs=0.005)
    assert _flops(resunet) / 1e9 == pytest.approx(6.39, abs=0.01)
    assert _flops(resunet) < _flops(unet) / 3.5
    small = ResUNet(base_width=4, out_channels=2)
    assert small(torch.zeros(2, 1, 64, 96)).shape == (2, 2, 64, 96)


@pytest.mark.parametrize("name", NETS)
def test_encode_then_decode_is_the_forward_pass(name: str) -> None:
    net = getattr(models, name)(base_width=4).eval()
    images = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        features = net.encode(images)
        assert features[-1].shape[1] == net.bottleneck_channels
        torch.testing.assert_close(net.forward_head(net.decode(features)), net(images))


def _module(**options) -> SegmentationModule:
    torch.manual_seed(0)
    return SegmentationModule(UNet(base_width=4), BCEDiceLoss(), partial(torch.optim.Adam), **options)


def test_presence_loss_is_added_with_its_weight_and_learns_which_images_are_infected() -> None:
    module = _module(presence_weight=0.5)
    images = torch.rand(4, 1, 32, 32)
    masks = torch.zeros(4, 1, 32, 32)
    masks[:2, :, 8:16, 8:16] = 1  # two infected (brighter there), two healthy
    images = images + masks
    batch = {"image": images, "mask": masks, "name": ["a", "b", "c", "d"]}
    module.train()
    logits, presence = module.network(images)
    expected = BCEDiceLoss()(logits, masks) + 0.5 * torch.nn.functional.binary_cross_entropy_with_logits(
        presence, torch.tensor([1.0, 1.0, 0.0, 0.0])
    )
    torch.testing.assert_close(module._shared_step(batch, "train")[0], expected)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
    for _ in range(30):
        optimizer.zero_grad()
        module._shared_step(batch, "train")[0].backward()
        optimizer.step()
    with torch.no_grad():  # train mode: batch statistics, as in the steps above
        probability = module.network(images)[1].sigmoid()
    assert (probability[:2] > 0.5).all() and (probability[2:] < 0.5).all()


def test_presence_label_smoothing_trains_the_head_towards_soft_targets() -> None:
    module = _module(presence_weight=1.0, presence_label_smoothing=0.2).train()
    masks = torch.zeros(2, 1, 32, 32)
    masks[0, :, 8:16, 8:16] = 1  # the first image infected, the second healthy
    images = torch.rand(2, 1, 32, 32)
    loss = module._shared_step({"image": images, "mask": masks, "name": ["a", "b"]}, "train")[0]
    logits, presence = module.network(images)
    soft = torch.nn.functional.binary_cross_entropy_with_logits(presence, torch.tensor([0.9, 0.1]))
    torch.testing.assert_close(loss, BCEDiceLoss()(logits, masks) + soft)
    for smoothing in (-0.1, 1.0):
        with pytest.raises(ValueError, match="presence_label_smoothing is"):
            _module(presence_weight=1.0, presence_label_smoothing=smoothing)


def test_segment_present_only_scores_segmentation_on_infected_images_and_presence_on_all() -> None:
    module = _module(presence_weight=0.5, segment_present_only=True).train()
    masks = torch.zeros(3, 1, 32, 32)
    masks[1, :, 4:12, 4:12] = 1  # only the second image is infected
    images = torch.rand(3, 1, 32, 32)
    batch = {"image": images, "mask": masks, "name": ["a", "b", "c"]}
    loss = module._shared_step(batch, "train")[0]
    logits, presence = module.network(images)
    presence_loss = torch.nn.functional.binary_cross_entropy_with_logits(presence, torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(loss, BCEDiceLoss()(logits[1:2], masks[1:2]) + 0.5 * presence_loss)
    healthy = {"image": images[[0, 2]], "mask": masks[[0, 2]], "name": ["a", "c"]}
    loss = module._shared_step(healthy, "train")[0]
    torch.testing.assert_close(loss, 0.5 * torch.nn.functional.binary_cross_entropy_with_logits(
        module.network(healthy["image"])[1], torch.zeros(2)))  # fmt: skip
    loss.backward()  # only the presence loss: it still trains the encoder
    assert module.network.net.encoder[0][0][0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="segment_present_only needs a presence head"):
        _module(segment_present_only=True)


def test_segment_present_only_scores_the_lungs_on_every_image() -> None:
    """The lungs are in every image: only the infection channel is limited to infected images."""
    torch.manual_seed(0)
    net = UNet(base_width=4, out_channels=2)
    options = {"targets": ["lung", "infection"], "presence_weight": 0.5, "segment_present_only": True}
    module = SegmentationModule(net, BCEDiceLoss(), partial(torch.optim.Adam), **options).train()
    masks = torch.zeros(3, 2, 32, 32)
    masks[:, 0, 2:30, 4:28] = 1  # lungs everywhere
    masks[1, 1, 4:12, 4:12] = 1  # infection in the second image only
    images = torch.rand(3, 1, 32, 32)
    loss = module._shared_step({"image": images, "mask": masks, "name": ["a", "b", "c"]}, "train")[0]
    logits, presence = module.network(images)
    infection = BCEDiceLoss()(logits[1:2, 1:], masks[1:2, 1:])
    lungs = BCEDiceLoss()(logits[:, :1], masks[:, :1])
    presence_loss = torch.nn.functional.binary_cross_entropy_with_logits(presence, torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(loss, (infection + lungs) / 2 + 0.5 * presence_loss)
    healthy = {"image": images[[0]], "mask": masks[[0]], "name": ["a"]}
    module._shared_step(healthy, "train")[0].backward()
    lung_head, infection_head = module.network.net.head.weight.grad.flatten(1).abs().sum(1)
    assert lung_head > 0 and infection_head == 0  # a healthy image trains the lungs, not the infection


def test_presence_gate_empties_masks_below_the_threshold() -> None:
    network = _module(presence_weight=1.0).network.eval()
    images = torch.rand(3, 1, 32, 32)
    ungated = Predictor([network], ["infection"], InferenceSettings()).predict(images)
    gate = float(ungated.presence.median())
    gated = Predictor([network], ["infection"], InferenceSettings(presence_threshold=gate)).predict(images)
    absent = ungated.presence < gate
    assert absent.sum() == 1
    assert (gated.probability[absent] == 0).all() and not gated.mask[absent].any()
    torch.testing.assert_close(gated.probability[~absent], ungated.probability[~absent])
    torch.testing.assert_close(gated.presence, ungated.presence)


def test_presence_options_need_a_head_and_a_net_that_exposes_its_encoder() -> None:
    with pytest.raises(ValueError, match="presence_threshold needs networks with a presence head"):
        Predictor([_module().network], ["infection"], InferenceSettings(presence_threshold=0.5))

    class Opaque(torch.nn.Module):
        out_channels = 1

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return images

    with pytest.raises(ValueError, match="Opaque has none"):
        SegmentationModule(Opaque(), BCEDiceLoss(), partial(torch.optim.Adam), presence_weight=1.0)


def test_progressive_resizing_trains_at_the_scheduled_side_and_evaluates_at_input_size() -> None:
    resizing = ProgressiveResizing([[3, 64], [0, 32]])
    assert [resizing.side_at(epoch) for epoch in range(5)] == [32, 32, 32, 64, 64]
    module = _module(input_size=64)
    seen = []
    module.network.net.register_forward_pre_hook(lambda net, inputs: seen.append(inputs[0].shape[-1]))
    module.network.train_input_size = resizing.side_at(0)
    images = torch.rand(2, 1, 128, 128)
    assert module.train()(images).shape == (2, 1, 128, 128)
    with torch.no_grad():
        module.eval()(images)
    assert seen == [32, 64]
    with pytest.raises(ValueError, match=r"\[\[first_epoch, side\]"):
        ProgressiveResizing([[0, 32, 1]])


def test_choices_score_dice_on_infected_images_and_cleanliness_on_healthy_ones() -> None:
    # three images: infected (truth 10 px), infected (truth 4 px), healthy; two thresholds
    predicted = np.array([[10.0, 6.0], [4.0, 0.0], [700.0, 0.0]])
    intersection = np.array([[8.0, 6.0], [4.0, 0.0], [0.0, 0.0]])
    truth = np.array([10.0, 4.0, 0.0])
    presence = np.array([0.9, 0.3, 0.6])
    choices = score_choices(predicted, intersection, truth, presence, [0.4, 0.6], [0.5, 0.7], max_area=655)
    by_pair = {(c.threshold, c.presence_threshold): c for c in choices}
    assert by_pair[0.4, None].dice == pytest.approx((16 / 20 + 1) / 2)
    assert by_pair[0.4, None].healthy_clean_rate == 0  # 700 px >= 655
    assert by_pair[0.6, None].dice == pytest.approx((12 / 16 + 0) / 2)
    assert by_pair[0.4, 0.5].dice == pytest.approx((16 / 20 + 0) / 2)  # second image gated off
    assert by_pair[0.4, 0.7].healthy_clean_rate == 1  # healthy image gated off
    # clean enough: (0.6, no gate) Dice 0.375, (0.4, gate 0.7) Dice 0.4, (0.6, gate 0.7) Dice 0.375
    assert choose(choices, 0.9) == Choice(0.4, 0.7, pytest.approx(0.4), 1.0)
    assert {choice.flip_tta for choice in choices} == {False}
    assert choose(choices, 0.0) == by_pair[0.4, None]
    with pytest.raises(ValueError, match="eval_classes"):
        score_choices(predicted[:2], intersection[:2], truth[:2], None, [0.4, 0.6], [], max_area=655)


ALL_CLASSES = ["data.classes=[COVID-19,Non-COVID,Normal]", "data.eval_classes=[COVID-19,Non-COVID,Normal]"]


@pytest.mark.slow
def test_cross_fitting_scores_each_image_by_the_choice_of_the_half_it_is_not_in() -> None:
    from covidseg.evaluation.thresholds import SweepPass, cross_fitted

    # 20 infected images (truth 100 px) and 20 healthy ones, two thresholds: 0.4 marks 120 px of each
    # infected image (100 right) and 50 px of each healthy one; 0.6 marks 80 px (all right) and none
    truth = np.array([100.0] * 20 + [0.0] * 20)
    predicted = np.array([[[120.0, 80.0]]] * 20 + [[[50.0, 0.0]]] * 20)
    intersection = np.array([[[100.0, 80.0]]] * 20 + [[[0.0, 0.0]]] * 20)
    sweep = SweepPass(False, predicted, intersection, truth, None)
    # at >= 90 % clean only 0.6 qualifies, on either half
    choices, dice, clean = cross_fitted([sweep], [0.0], [0.4, 0.6], [], 40.0, 0.9, seed=0)
    assert [choice.threshold for choice in choices] == [0.6, 0.6]
    assert len(dice) == 20 and np.allclose(dice, 160 / 180) and len(clean) == 20 and clean.all()
    # with no floor, 0.4 (Dice 200/220) wins on both halves, and the healthy images are not clean
    choices, dice, clean = cross_fitted([sweep], [0.0], [0.4, 0.6], [], 40.0, 0.0, seed=0)
    assert [choice.threshold for choice in choices] == [0.4, 0.4]
    assert np.allclose(dice, 200 / 220) and not clean.any()
    # whatever the halves, each infected image is scored once
    assert len(cross_fitted([sweep], [0.0], [0.4, 0.6], [], 40.0, 0.5, seed=3)[1]) == 20


def test_calibrate_choices_are_what_eval_measures_with_them(compose_cfg, tmp_path: Path) -> None:
    """Train a presence-head model, calibrate it on Val, then evaluate Val with one of the pairs:
    eval's per-image Dice on infected images and clean rate on healthy ones match calibration's."""
    cfg = compose_cfg("train", [*FAST, *ALL_CLASSES, "model.presence_weight=0.5", "trainer.max_epochs=2", "test=false"])
    train(cfg)
    checkpoint = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    data = [o for o in FAST if o.startswith("data")]
    calibration_cfg = compose_cfg("calibrate", [f"ckpt_path={checkpoint}", *data, "min_healthy_rate=0.5"])
    result = calibrate(calibration_cfg)
    assert json.loads((Path(calibration_cfg.paths.output_dir) / "calibration.json").read_text()) == result
    assert result["infected_images"] > 0 and result["healthy_images"] > 0
    # flip TTA off/on x 4 small-region shares x 9 thresholds x (no gate + 14 presence thresholds)
    assert len(result["all"]) == 2 * 4 * 9 * 15
    assert Choice(**result["chosen"]) == choose([Choice(**row) for row in result["all"]], 0.5)
    crossed = result["cross_fitted"]
    assert len(crossed["choices"]) == 2
    assert crossed["dice_interval"][0] <= crossed["dice"] <= crossed["dice_interval"][1]
    as_trained = result["as_trained"]
    assert as_trained["flip_tta"] is False and as_trained["presence_threshold"] is None
    assert as_trained["min_region_share"] == 0
    # any choice (here a gated one with flip TTA, dropping regions under 0.9 % of the image) is what eval then measures
    pair = next(
        row
        for row in result["all"]
        if row["threshold"] == 0.45 and row["presence_threshold"] == 0.5 and row["flip_tta"]
        and row["min_region_share"] == 0.009
    )  # fmt: skip
    settings = [f"threshold={pair['threshold']}", f"presence_threshold={pair['presence_threshold']}", "flip_tta=true",
                f"min_region_share={pair['min_region_share']}"]  # fmt: skip
    eval_cfg = compose_cfg("eval", [f"ckpt_path={checkpoint}", *data, *ALL_CLASSES, "data.split=Val", *settings])
    evaluate(eval_cfg)
    with (Path(eval_cfg.paths.output_dir) / "per_image.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    infected = [row for row in rows if float(row["truth_area_infection"]) > 0]
    healthy = [row for row in rows if float(row["truth_area_infection"]) == 0]
    assert np.mean([float(row["dice_infection"]) for row in infected]) == pytest.approx(pair["dice"], abs=1e-6)
    clean = np.mean([float(row["predicted_area_infection"]) < 0.01 * 64**2 for row in healthy])
    assert clean == pytest.approx(pair["healthy_clean_rate"])
    assert all(0 <= float(row["presence_probability"]) <= 1 for row in rows)
    loaded = load_predictor(str(checkpoint), tmp_path, threshold=0.3, presence_threshold=0.4)
    assert (
        loaded.spec.inference == loaded.predictor.settings == InferenceSettings(threshold=0.3, presence_threshold=0.4)
    )


@pytest.mark.slow
def test_the_quickstart_run_learns_the_phantoms(compose_cfg) -> None:
    """The README's first command, with its outputs in the test's folder."""
    from covidseg.train import train

    metrics, _ = train(compose_cfg("train", ["experiment=quickstart", "test=false"]))
    assert metrics["val/dice"] >= 0.5


def test_progress_is_one_line_per_epoch_when_stdout_is_not_a_terminal(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    from lightning.pytorch.callbacks import RichProgressBar

    from covidseg.training.callbacks import EpochLines, progress_display

    assert isinstance(progress_display(), EpochLines)  # pytest captures stdout: not a terminal
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert isinstance(progress_display(), RichProgressBar)
    monkeypatch.undo()

    class Trainer:
        is_global_zero, current_epoch, max_epochs = True, 2, 12
        callback_metrics = {"val/dice": torch.tensor(0.5), "train/loss_epoch": torch.tensor(1.25), "lr": 1}

    EpochLines().on_train_epoch_end(Trainer(), None)
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith("epoch 3/12  ") and line.endswith("train/loss_epoch 1.2500 val/dice 0.5000")
