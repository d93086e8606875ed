"""The training precisions (``train.precision``) and the one table of their low-precision dtypes."""
from __future__ import annotations

from typing import Optional

import torch

# precision name → compute dtype of autocast / sharded compute copies; fp32 has none
LOWP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` → bf16 on CUDA, fp32 elsewhere; any other name unchanged."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def lowp_dtype(precision: str) -> Optional[torch.dtype]:
    """The low-precision dtype of a resolved precision name (None for fp32)."""
    return LOWP_DTYPES.get(precision)
