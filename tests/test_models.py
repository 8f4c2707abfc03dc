import pytest
import torch

from covidseg.metrics import SegmentationScores
from covidseg.models import BCEDiceLoss, UNet


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


def test_flip_tta_averages_the_mirrored_prediction_in_eval_mode_only() -> None:
    from functools import partial

    from covidseg.models import SegmentationModule

    torch.manual_seed(0)
    module = SegmentationModule(UNet(base_width=4), BCEDiceLoss(), partial(torch.optim.Adam), input_size=32).eval()
    images = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        plain = module(images)
        mirrored = module(images.flip(-1)).flip(-1)
        module.flip_tta = True
        torch.testing.assert_close(module(images), (plain + mirrored) / 2)
        assert plain.shape == (2, 1, 64, 64)  # input_size 32 inside, full resolution out
        module.train()
        assert module(images).shape == plain.shape


def test_restrict_to_lungs_drops_infection_outside_predicted_lungs_in_eval_only() -> None:
    from functools import partial

    from covidseg.models import SegmentationModule

    class LungWhereBright(torch.nn.Module):
        """Lung logit = pixel - 0.5; infection logit = 1 everywhere."""

        in_channels, out_channels = 1, 2

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return torch.cat([images - 0.5, torch.ones_like(images)], dim=1)

    module = SegmentationModule(
        LungWhereBright(), BCEDiceLoss(), partial(torch.optim.Adam), targets=["lung", "infection"],
        restrict_to_lungs=True, channels_last=False,
    ).eval()  # fmt: skip
    images = torch.rand(2, 1, 32, 32)
    infection = module(images)[:, 1]
    outside = images[:, 0] <= 0.5
    assert (infection[outside] <= 0).all()  # not above the 0.5 threshold
    torch.testing.assert_close(infection[~outside], (images[:, 0] - 0.5).clamp(max=1)[~outside])
    assert (module.train()(images)[:, 1] == 1).all()


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
