"""What the hardware can do: native bfloat16, and the precision a ``precision=`` parameter means.

Used by every method with a ``precision`` option (the autoencoder's training, the anomaly
clustering distances): ``"fp32"``, ``"bf16"``, or ``"auto"`` = bf16 only where the device
computes it natively. Where a CPU lacks it, bf16 is emulated by PyTorch (correct, and many
times slower), so ``"auto"`` keeps fp32 there.
"""

from __future__ import annotations

import warnings

import torch

from anomalib_study.errors import ParameterError

__all__ = ["PRECISIONS", "native_bf16", "resolve_precision"]

#: the values of a ``precision`` parameter
PRECISIONS = ("fp32", "bf16", "auto")


def native_bf16(device: str | torch.device = "cpu") -> bool:
    """True when ``device`` computes bfloat16 natively (CPU: avx512_bf16 / amx_bf16 / ARM bf16 flags)."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    try:
        with open("/proc/cpuinfo") as handle:
            flags = set()
            for line in handle:
                if line.lower().startswith(("flags", "features")):
                    flags.update(line.split(":", 1)[1].split())
        return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    except OSError:  # no /proc (macOS, Windows): trust what PyTorch dispatches to
        capability = torch.backends.cpu.get_cpu_capability().upper()
        return "BF16" in capability or "AMX" in capability


def resolve_precision(precision: str, device: str | torch.device = "cpu") -> str:
    """``"fp32"`` / ``"bf16"`` / ``"auto"`` -> the precision used, ``"fp32"`` or ``"bf16"``."""
    if precision not in PRECISIONS:
        raise ParameterError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    device = torch.device(device)
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision == "bf16" and device.type == "cuda" and not native_bf16(device):
        raise ParameterError(f"precision='bf16': {device} does not support bfloat16; use 'fp32' or 'auto'")
    if precision == "bf16" and not native_bf16(device):
        warnings.warn(
            "precision='bf16' on a CPU without native bfloat16: it is emulated and slow "
            "(precision='auto' picks fp32 here)",
            stacklevel=3,
        )
    return precision
