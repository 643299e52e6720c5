"""The policy's per-token log-probs of a pair batch: the one place where training and the reference stage run the
model on a batch (shared-prefix packed or as plain rows, same numbers)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from muffin.family import ModelFamily
from muffin.fast.layout import LogpsPlan, plan_batch_logps
from muffin.fast.logps import token_logps
from muffin.fast.packing import run_batch_logps, supports_packing
from muffin.train.data import pair_groups
from utils.cuda import to_device


def concatenated_logps(
    family: ModelFamily,
    batch: dict[str, Any],
    packed: bool | None = None,
    plan: LogpsPlan | None = None,
    *,
    model: torch.nn.Module | None = None,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of a pair batch (chosen rows, then rejected rows) under the family's current model.

    Args:
        family: the loaded family.
        batch: ``PairCollator`` output (or ``family.encode`` output of chosen rows then rejected rows).
        packed: the shared-prefix path of ``muffin.fast.packing`` (each pair's image and prompt encoded once, both
            answers attending to them, log-probs without full-vocabulary float32 logits); False runs chosen and
            rejected as separate sequences (the original's way). Default: ``supports_packing(family)``. Both give
            the same numbers (tests/test_packing.py).
        plan: the packed path's CPU work done ahead (``plan_batch_logps(family, batch, pair_groups(batch))``); by
            default the batch's ``packing_plan`` (``PairCollator(packing=True)`` makes it), else made here.
        model: what the plain path calls instead of ``family.model`` (the launcher's wrapper in training).
        compute_dtype: autocast dtype of float32 LoRA adapters on a half-precision model
            (``muffin.train.peft_patch.lora_compute_dtype``); None runs without autocast.

    Returns:
        logps (2B, T-1) float32, zero off the answer; mask (2B, T-1) bool; aligned with ``input_ids[:, 1:]``.
    """
    if packed is None:
        packed = supports_packing(family)
    with _autocast(family, compute_dtype):
        if packed:
            plan = plan or batch.get("packing_plan") or plan_batch_logps(family, batch, pair_groups(batch))
            return run_batch_logps(family, batch, plan)
        logits = family.forward(batch, model=model)  # (2B, T, V)
        return token_logps(
            logits, to_device(batch["input_ids"], logits.device), to_device(batch["answer_mask"], logits.device)
        )


def _autocast(family: ModelFamily, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on the model's device; a no-op for None. Gradient checkpointing replays the state."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=next(family.model.parameters()).device.type, dtype=dtype)
