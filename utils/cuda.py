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


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t`` on ``device`` without making the host wait for the GPU.

    A plain ``.to("cuda")`` of a host tensor ends with a stream synchronisation: the host stops until every kernel
    queued before it has run, and the GPU then idles while the host launches the next ones. Here a host tensor is
    pinned (a no-op if it already is) and copied asynchronously, in stream order; the caching host allocator keeps
    the pinned buffer alive until the copy has run. Anything else is ``t.to(device)``.
    """
    device = torch.device(device)
    if t.device.type == "cpu" and device.type == "cuda":
        return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)
    return t.to(device)


def configure_attention_backends(cudnn_sdp: bool = False) -> None:
    """Enable or disable cuDNN SDPA (off by default, see the module docstring); a no-op without CUDA."""
    global _done
    if not torch.cuda.is_available():
        return
    torch.backends.cuda.enable_cudnn_sdp(cudnn_sdp)
    if not _done:
        logger.info("cuDNN scaled-dot-product attention %s", "enabled" if cudnn_sdp else "disabled")
        _done = True
