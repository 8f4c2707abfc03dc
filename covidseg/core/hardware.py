"""What this CPU is fast at: mixed precision in bfloat16 only where the instructions exist.

Lightning's ``bf16-mixed`` runs on any CPU, but without native bf16 instructions (AVX512-BF16 or
AMX) the conversions make it slower than fp32, so ``trainer=cpu`` asks :func:`cpu_precision`.
"""

from __future__ import annotations

import logging
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
INT8_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})  # int8 dot products (VNNI) or AMX


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return frozenset(word for line in text.splitlines() if line.startswith("flags") for word in line.split()[2:])


@cache
def cpu_precision() -> str:
    """``bf16-mixed`` where the CPU has native bf16 instructions, else ``32-true`` (with a note)."""
    if cpu_flags() & BF16_FLAGS:
        return "bf16-mixed"
    log.info("this CPU has no native bf16 instructions (avx512_bf16, amx_bf16): training in fp32")
    return "32-true"


@cache
def cpu_has_int8_dot_products() -> bool:
    """Whether the CPU multiplies int8 natively (VNNI or AMX), where int8 inference pays."""
    return bool(cpu_flags() & INT8_FLAGS)
