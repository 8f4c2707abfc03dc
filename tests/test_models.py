import numpy as np
import pytest
import torch

from covidseg.core.metrics import SegmentationScores
from covidseg.models import BCEDiceLoss, UNet
from covidseg.models.losses import focal_tversky_loss, lovasz_hinge_loss


def test_unet_has_the_studys_parameter_count() -> None:
    parameters = sum(p.numel() for p in UNet().parameters())
    assert abs(parameters - 7.76e6) <= 0.01e6


@pytest.mark.parametrize(("base_width", "depth", "out_channels"), [(4, 4, 1), (8, 3, 2)])
def test_unet_output_matches_input_size(base_width: int, depth: int, out_channels: int) -> None:
    net = UNet(base_width=base_width, depth=depth, out_channels=out_channels)
    assert net(torch.zeros(2, 1, 64, 48)).shape == (2, out_channels, 64, 48)


def test_loss_is_low_for_confident_right_answers_and_high_for_wrong_ones() -> None:
    target = torch.zeros(1, 1, 4, 4)
    target[..., :2, :] = 1
    right = (target * 2 - 1) * 20
    loss = BCEDiceLoss()
    assert loss(right, target) < 1e-3
    assert loss(-right, target) > 10


def test_loss_weights_select_terms() -> None:
    logits = torch.zeros(1, 1, 2, 2)
    target = torch.ones(1, 1, 2, 2)
    bce_only = BCEDiceLoss(bce_weight=1, dice_weight=0)(logits, target)
    dice_only = BCEDiceLoss(bce_weight=0, dice_weight=1)(logits, target)
    assert bce_only == pytest.approx(torch.log(torch.tensor(2.0)).item())
    # soft Dice with p = 0.5 everywhere: 1 - (2*2 + 1) / (2 + 4 + 1)
    assert dice_only == pytest.approx(1 - 5 / 7)


def test_lovasz_hinge_at_unit_margins_is_twice_the_jaccard_loss_per_image() -> None:
    # logits of +-1 make every pixel's hinge error 0 (right) or 2 (wrong); the Lovász extension is
    # then 2 * (1 - IoU) of the predicted mask, per image, averaged over the batch
    generator = torch.Generator().manual_seed(0)
    target = (torch.rand(3, 1, 8, 8, generator=generator) > 0.6).float()
    predicted = (torch.rand(3, 1, 8, 8, generator=generator) > 0.5).float()
    logits = predicted * 2 - 1
    intersection = (predicted * target).flatten(1).sum(1)
    union = ((predicted + target) > 0).float().flatten(1).sum(1)
    expected = (2 * (1 - intersection / union)).mean()
    assert lovasz_hinge_loss(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)
    assert lovasz_hinge_loss(target * 4 - 2, target).item() == 0.0  # right with margin > 1


def test_lovasz_weight_adds_the_hinge_and_gives_gradients() -> None:
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 1, 8, 8, generator=generator, requires_grad=True)
    target = (torch.rand(2, 1, 8, 8, generator=generator) > 0.7).float()
    combined = BCEDiceLoss(lovasz_weight=0.5)(logits, target)
    expected = BCEDiceLoss()(logits, target) + 0.5 * lovasz_hinge_loss(logits, target)
    torch.testing.assert_close(combined, expected)
    combined.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_focal_tversky_by_hand_and_misses_cost_more_than_false_alarms() -> None:
    target = torch.zeros(1, 1, 4, 4)
    target[..., :2, :] = 1  # 8 infected pixels of 16
    # p = 0.5 everywhere: TP 4, missed 4, false alarms 4 -> Tversky (4 + 1) / (4 + 0.7*4 + 0.3*4 + 1)
    assert focal_tversky_loss(torch.zeros(1, 1, 4, 4), target).item() == pytest.approx((1 - 5 / 9) ** 0.75)
    confident = (target * 2 - 1) * 20
    assert focal_tversky_loss(confident, target).item() < 1e-3
    missed, false_alarm = confident.clone(), confident.clone()
    missed[..., 0, :2] = -20  # two infected pixels called healthy
    false_alarm[..., 3, :2] = 20  # two healthy pixels called infected
    assert focal_tversky_loss(missed, target) > focal_tversky_loss(false_alarm, target) > 0
    logits = confident.clone().requires_grad_()
    combined = BCEDiceLoss(dice_weight=0, focal_tversky_weight=1)(logits, target)
    combined.backward()
    assert torch.isfinite(logits.grad).all()  # finite even where an image is already perfect


def _masks(*rows: list[int]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32).reshape(len(rows), 1, 1, -1)


def test_scores_per_image_and_pooled_by_hand() -> None:
    metric = SegmentationScores(from_logits=False)
    predicted = _masks([0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0])
    truth = _masks([0, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0])
    metric.update(predicted, truth)
    scores = metric.compute()
    # both empty -> 1; 2*1/(2+1); empty prediction -> 0; false positive on empty truth -> 0
    assert scores["dice"] == pytest.approx((1 + 2 / 3 + 0 + 0) / 4)
    assert scores["iou"] == pytest.approx((1 + 1 / 2 + 0 + 0) / 4)
    # pooled: intersection 1, predicted 3, truth 2
    assert scores["dice_pooled"] == pytest.approx(2 / 5)
    assert scores["iou_pooled"] == pytest.approx(1 / 4)
    rows = metric.per_image()
    assert rows["predicted_area"].tolist() == [0, 2, 0, 1]
    assert rows["truth_area"].tolist() == [0, 1, 1, 0]


def test_scores_threshold_logits() -> None:
    metric = SegmentationScores(threshold=0.5)
    metric.update(torch.tensor([[[3.0, -3.0]]]), torch.tensor([[[1.0, 0.0]]]))
    assert metric.compute()["dice"] == pytest.approx(1.0)


def test_scores_all_empty_split_is_perfect() -> None:
    metric = SegmentationScores(from_logits=False)
    metric.update(torch.zeros(3, 1, 4, 4), torch.zeros(3, 1, 4, 4))
    assert all(value == pytest.approx(1.0) for value in metric.compute().values())


def test_flip_tta_averages_the_mirrored_probabilities_at_the_callers_side() -> None:
    from covidseg.inference.model_spec import InferenceSettings
    from covidseg.inference.predictor import Predictor
    from covidseg.models.network import SegmentationNetwork

    torch.manual_seed(0)
    network = SegmentationNetwork(UNet(base_width=4), input_size=32).eval()
    images = torch.rand(2, 1, 64, 64)
    plain = Predictor([network], ["infection"], InferenceSettings()).predict(images).probability
    mirrored = Predictor([network], ["infection"], InferenceSettings()).predict(images.flip(-1)).probability.flip(-1)
    flipped = Predictor([network], ["infection"], InferenceSettings(flip_tta=True)).predict(images)
    torch.testing.assert_close(flipped.probability, (plain + mirrored) / 2)
    assert plain.shape == (2, 1, 64, 64)  # input_size 32 inside, the caller's side out
    assert torch.equal(flipped.mask, flipped.probability > 0.5)


def test_restrict_to_lungs_drops_infection_outside_predicted_lungs() -> None:
    from covidseg.inference.model_spec import InferenceSettings
    from covidseg.inference.predictor import Predictor
    from covidseg.models.network import SegmentationNetwork

    class LungWhereBright(torch.nn.Module):
        """Lung logit = pixel - 0.5; infection logit = 1 everywhere."""

        in_channels, out_channels = 1, 2

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return torch.cat([images - 0.5, torch.ones_like(images)], dim=1)

    network = SegmentationNetwork(LungWhereBright())
    targets = ["lung", "infection"]
    images = torch.rand(2, 1, 32, 32)
    infection = (
        Predictor([network], targets, InferenceSettings(restrict_to_lungs=True)).predict(images).probability[:, 1]
    )
    outside = images[:, 0] <= 0.5
    assert (infection[outside] <= 0.5).all()  # not above the 0.5 threshold
    torch.testing.assert_close(infection, torch.minimum((images[:, 0] - 0.5).sigmoid(), torch.tensor(1.0).sigmoid()))
    unrestricted = Predictor([network], targets, InferenceSettings()).predict(images).probability[:, 1]
    assert torch.allclose(unrestricted, torch.tensor(1.0).sigmoid())
    with pytest.raises(ValueError, match="restrict_to_lungs needs the targets lung and infection"):
        Predictor([network], ["infection", "other"], InferenceSettings(restrict_to_lungs=True))


def test_an_ensemble_averages_probabilities_and_presence() -> None:
    from covidseg.inference.model_spec import InferenceSettings
    from covidseg.inference.predictor import Predictor
    from covidseg.models.network import SegmentationNetwork

    torch.manual_seed(0)
    networks = [SegmentationNetwork(UNet(base_width=4), presence_head=True).eval() for _ in range(3)]
    images = torch.rand(2, 1, 32, 32)
    alone = [Predictor([n], ["infection"], InferenceSettings()).predict(images) for n in networks]
    together = Predictor(networks, ["infection"], InferenceSettings(threshold=0.4)).predict(images)
    torch.testing.assert_close(together.probability, torch.stack([a.probability for a in alone]).mean(0))
    torch.testing.assert_close(together.presence, torch.stack([a.presence for a in alone]).mean(0))
    assert torch.equal(together.mask, together.probability > 0.4)
    with pytest.raises(ValueError, match="disagree on the presence head"):
        Predictor([networks[0], SegmentationNetwork(UNet(base_width=4))], ["infection"], InferenceSettings())


@pytest.mark.parametrize(
    ("net", "millions"),
    [("AttentionUNet", 7.85), ("UNetPlusPlus", 9.159)],
)
def test_other_architectures_keep_the_interface(net: str, millions: float) -> None:
    import covidseg.models as models

    default = getattr(models, net)()
    assert sum(p.numel() for p in default.parameters()) / 1e6 == pytest.approx(millions, abs=0.005)
    small = getattr(models, net)(base_width=4, out_channels=2)
    assert small(torch.zeros(2, 1, 64, 48)).shape == (2, 2, 64, 48)


def test_unetpp_deep_supervision_averages_every_head() -> None:
    from covidseg.models import UNetPlusPlus

    net = UNetPlusPlus(base_width=4, depth=3, deep_supervision=True).eval()
    images = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        features = net.forward_features(images)
        expected = sum(head(f) for head, f in zip(net.heads, features, strict=True)) / 3
        torch.testing.assert_close(net(images), expected)


def test_small_regions_are_dropped_but_never_the_largest() -> None:
    from covidseg.inference.regions import drop_small_regions

    mask = np.zeros((64, 64), bool)
    mask[5:25, 5:25] = True  # 400 px
    mask[40:43, 40:43] = True  # 9 px
    mask[50:55, 50:55] = mask[55:60, 55:60] = True  # 50 px, touching only at a corner: one region
    kept = drop_small_regions(mask, 0.01)  # under 41 px goes
    assert kept[5:25, 5:25].all() and not kept[40:43, 40:43].any() and kept[50:60, 50:60].sum() == 50
    assert kept.sum() == 450
    assert drop_small_regions(mask, 0.0) is mask
    assert drop_small_regions(mask, 0.5).sum() == 400  # all small: only the largest stays
    specks = np.zeros((64, 64), bool)
    specks[0, 0] = specks[10, 10] = specks[10, 11] = True
    assert drop_small_regions(specks, 0.01).sum() == 2  # never emptied by size alone
    empty = np.zeros((64, 64), bool)
    assert not drop_small_regions(empty, 0.01).any()


def test_the_predictor_and_segment_drop_small_regions_of_the_infection_only() -> None:
    from covidseg.inference.model_spec import InferenceSettings, ModelSpec
    from covidseg.inference.predictor import Answer, Predictor
    from covidseg.inference.segment import segment
    from covidseg.models.network import SegmentationNetwork

    pattern = torch.full((64, 64), -5.0)
    pattern[8:40, 8:40] = 5.0  # 1,024 px
    pattern[50:54, 50:54] = 5.0  # 16 px: 0.4 % of the image

    class Pattern(torch.nn.Module):
        """The same lung and infection logits for every image."""

        in_channels, out_channels = 1, 2

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return pattern.expand(len(images), 2, 64, 64).clone()

    network = SegmentationNetwork(Pattern())
    targets = ["lung", "infection"]
    images = torch.rand(2, 1, 64, 64)
    plain = Predictor([network], targets, InferenceSettings()).predict(images)
    dropped = Predictor([network], targets, InferenceSettings(min_region_share=0.005)).predict(images)
    torch.testing.assert_close(dropped.probability, plain.probability)
    assert plain.mask[:, 1].flatten(1).sum(1).tolist() == [1040, 1040]
    assert dropped.mask[:, 1].flatten(1).sum(1).tolist() == [1024, 1024]  # the speck is gone
    assert torch.equal(dropped.mask[:, 0], plain.mask[:, 0])  # the lungs keep theirs

    # at each image's own size (predict, serve, ONNX): the share is of that image
    spec = ModelSpec.model_validate(
        {
            "networks": [{"name": "unet", "options": {"out_channels": 2}}],
            "targets": targets,
            "image_size": 64,
            "inference": {"min_region_share": 0.005},
        }
    )
    probability = plain.probability.numpy()
    results = segment(lambda batch: Answer(probability[: len(batch)]), spec, [np.zeros((128, 96), np.uint8)])
    assert results[0].mask.shape == (128, 96)
    assert results[0].mask.sum() == 1024 * 3  # the 2 x 1.5 upscaled square, without the speck
