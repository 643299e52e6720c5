"""Tiny random checkpoints of every supported architecture, built offline from the real config classes.

Used by the tests and by anyone who wants to run the code without downloading weights:

    python -m utils.tiny_models llava /tmp/tiny-llava            # llava-hf format
    python -m utils.tiny_models llava_original /tmp/tiny-llava-orig
    python -m utils.tiny_models minicpmv /tmp/tiny-minicpmv

Each builder saves with ``save_pretrained`` in the on-disk format of the published checkpoints and returns the
directory; ``muffin.load_family(dir)`` loads it like any real checkpoint.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from typing import Any

# arch -> "module:function(path, seed=..., **kw) -> Path"; imported lazily (timm etc. only when needed).
BUILDERS: dict[str, str] = {
    "llava": "llava.tiny:build_tiny_llava_hf",
    "llava_original": "llava.tiny:build_tiny_llava_original",
    "omnilmm": "omnilmm.tiny:build_tiny_omnilmm",
    "minicpmv": "omnilmm.minicpmv_tiny:build_tiny_minicpmv",  # native, published layout
    "minicpmv_remote": "omnilmm.tiny:build_tiny_minicpmv",  # a local remote-code model (trust_remote_code path)
    "qwen2_5_vl": "muffin.hf_vlm.tiny:build_tiny_qwen2_5_vl",
    "llava_next": "muffin.hf_vlm.tiny:build_tiny_llava_next",
    "idefics3": "muffin.hf_vlm.tiny:build_tiny_idefics3",
    "smolvlm": "muffin.hf_vlm.tiny:build_tiny_smolvlm",
    "gemma3": "muffin.hf_vlm.tiny:build_tiny_gemma3",
}


def build_tiny(arch: str, path: str | Path, *, seed: int = 0, **kwargs: Any) -> Path:
    """Build and save a tiny random checkpoint of ``arch`` (one of ``BUILDERS``) at ``path``."""
    if arch not in BUILDERS:
        raise ValueError(f"unknown tiny architecture '{arch}'. Available: {', '.join(sorted(BUILDERS))}.")
    module, fn = BUILDERS[arch].split(":")
    return getattr(importlib.import_module(module), fn)(Path(path), seed=seed, **kwargs)


def main() -> None:
    p = argparse.ArgumentParser(description="Build a tiny random checkpoint of a supported architecture.")
    p.add_argument("arch", choices=sorted(BUILDERS))
    p.add_argument("path")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print(build_tiny(args.arch, args.path, seed=args.seed))


if __name__ == "__main__":
    main()
