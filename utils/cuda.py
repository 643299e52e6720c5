"""CUDA runtime settings the toolkit applies when it puts a model on a GPU.

cuDNN's scaled-dot-product attention, which torch 2.11 picks first on Hopper, builds an execution graph per input
shape: in our DPO step profile on an H100 (`script/bench/profile_dpo.py`, 1.5B model, batch 8) its forward and
backward took 1.1 s and 1.6 s of CPU time for 252 ms of GPU work, because every packed batch has a new shape. The
flash and memory-efficient kernels have no such cost, so we switch the cuDNN backend off.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)
_done = False


def resolve_device(device: str | None = None) -> str:
    """``None``, ``""`` or ``"auto"``: ``cuda`` when a GPU is visible, else ``cpu``; anything else unchanged."""
    if not device or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def configure_attention_backends(cudnn_sdp: bool = False) -> None:
    """Enable or disable cuDNN SDPA (off by default, see the module docstring); a no-op without CUDA."""
    global _done
    if not torch.cuda.is_available():
        return
    torch.backends.cuda.enable_cudnn_sdp(cudnn_sdp)
    if not _done:
        logger.info("cuDNN scaled-dot-product attention %s", "enabled" if cudnn_sdp else "disabled")
        _done = True
