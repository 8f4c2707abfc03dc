"""Framework messages a covidseg user cannot act on, silenced once per command.

Each entry names what it hides and why it is safe to hide; anything else Lightning, torch or
Hydra says still reaches the user.
"""

from __future__ import annotations

import logging
import warnings

import torch

HIDDEN_WARNINGS = (
    # Lightning's own use of torch's pytree API (Lightning 2.6 with torch 2.13); nothing to change here
    r".*isinstance\(treespec, LeafSpec\).*",
    # RichModelSummary sizes parameters in fp32 under bf16-mixed: the parameters are fp32 there
    r"Precision bf16-mixed is not supported by the model summary.*",
)
HIDDEN_LOG_PREFIXES = ("💡 Tip",)  # Lightning's advertisement for its cloud logger


def _drop_hidden(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(HIDDEN_LOG_PREFIXES)


def quiet_framework_noise() -> None:
    for pattern in HIDDEN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    # TensorBoard's model graph is traced once with an example batch; the network's size checks
    # become constants in that trace, which is what the graph should show
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_drop_hidden)
