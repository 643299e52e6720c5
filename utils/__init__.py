"""Small shared helpers: image loading, crash-safe files, logging and distributed sharding."""

from __future__ import annotations

import glob
import os


def _deepspeed_quiet_on_cpu() -> None:
    """transformers imports DeepSpeed when it is installed, and DeepSpeed then warns "Setting accelerator to CPU" on
    every command of a machine without a GPU. Naming the CPU explicitly (``DS_ACCELERATOR``) keeps it quiet; a
    machine with any accelerator device node, or a user's own setting, is left to DeepSpeed's detection."""
    if "DS_ACCELERATOR" in os.environ:
        return
    if any(glob.glob(p) for p in ("/dev/nvidia[0-9]*", "/dev/kfd", "/dev/accel*", "/dev/davinci*", "/dev/dri")):
        return
    os.environ["DS_ACCELERATOR"] = "cpu"


_deepspeed_quiet_on_cpu()
