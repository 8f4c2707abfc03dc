"""Does a picture look like the chest X-rays a model learnt from? A score per image, and its reference.

A segmentation network answers every picture it is given: a scanned page, a photograph or noise
comes back with an infection mask. The check compares what the model's first network sees with what
it saw on real X-rays: the encoder's summary (each level's channel means, :meth:`SegmentationNetwork.
forward_with_summary`), standardised by its mean and spread over reference X-rays (Train), and the
length of the part that the reference's first principal components leave unexplained (a PCA
residual). X-rays are alike, so a few components explain them; other pictures leave a long residual.
The statistics are plain tensors in the model file (``xray_check.*``) and its spec says how many
(:class:`~covidseg.inference.model_spec.XrayCheckSpec`), so nothing executable travels with them.

Hand-written rather than scikit-learn's PCA: the fit is one ``torch.linalg.svd``, and the score has to
run inside the Predictor (and its exported graphs) as plain tensor arithmetic.
"""

from __future__ import annotations

import torch
from torch import nn

TENSOR_PREFIX = "xray_check."


class XrayCheck(nn.Module):
    """Scores encoder summaries (N, D): the PCA residual's length, per image (N,)."""

    def __init__(self, feature_count: int, components: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(feature_count))
        self.register_buffer("scale", torch.ones(feature_count))
        self.register_buffer("basis", torch.zeros(components, feature_count))

    def forward(self, summary: torch.Tensor) -> torch.Tensor:
        standard = (summary.float() - self.mean) / self.scale
        residual = standard - (standard @ self.basis.T) @ self.basis
        return residual.square().sum(1).sqrt()


def fit_xray_check(summaries: torch.Tensor, components: int) -> XrayCheck:
    """The reference of ``summaries`` (N, D) of real X-rays: mean, spread and the first
    ``components`` principal directions of the standardised summaries."""
    count, width = summaries.shape
    if not 0 < components < min(count, width):
        raise ValueError(f"components={components}: expected 1 to {min(count, width) - 1} for {count} images")
    summaries = summaries.double()
    mean = summaries.mean(0)
    spread = summaries.std(0)
    # a channel that (nearly) never varies on X-rays would turn rounding noise into a large score
    scale = spread.clamp_min(max(1e-6, 0.01 * float(spread.median())))
    _, _, directions = torch.linalg.svd((summaries - mean) / scale, full_matrices=False)
    check = XrayCheck(width, components)
    check.mean.copy_(mean.float())
    check.scale.copy_(scale.float())
    check.basis.copy_(directions[:components].float())
    return check
