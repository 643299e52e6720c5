"""Benchmark attention on the flat shared-prefix layout: FlexAttention (block mask) vs FlashAttention varlen.

    python -m script.bench.bench_attention

Layouts (Llama 7B attention: 32 heads of 128, bf16), drawn like the pipeline's batches:
- dpo: 8 pairs per row, prefix = 576 image tokens + 35-55 prompt tokens, chosen and rejected of 130-330 tokens each;
- reference: 8 pairs whose prompts carry two pairs over three or four distinct answers (the reference stage);
- conquer: 4 images per row, prefix 600-640 tokens, 20 yes/no questions of 10-25 tokens each.
Each method is checked against dense attention with the explicit mask (float32) first, then timed (CUDA events,
median of 20 after 5 warm-ups): forward alone, and forward + backward. TFLOP/s counts the allowed (query, key)
pairs only: 4·D·H per pair forward, 2.5x that for the backward.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch
from torch.nn.attention.flex_attention import flex_attention

from muffin.fast.attention import FLEX_BLOCK, _doc_block_mask, flat_mask_mod
from muffin.fast.varlen import segment_attention, varlen_plan
from script.bench.common import print_table

H, D = 32, 128


def layout(kind: str, rng: np.random.Generator, pad_to: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(doc, seg) of one flat row, padded to a multiple of ``pad_to``."""
    docs, segs = [], []
    if kind == "dpo":
        groups = [(576 + int(rng.integers(35, 56)), [int(rng.integers(130, 331)) for _ in range(2)]) for _ in range(8)]
    elif kind == "reference":
        groups = [
            (576 + int(rng.integers(35, 56)), [int(rng.integers(130, 331)) for _ in range(int(rng.integers(3, 5)))])
            for _ in range(4)
        ]
    elif kind == "conquer":
        groups = [(int(rng.integers(600, 641)), [int(rng.integers(10, 26)) for _ in range(20)]) for _ in range(4)]
    else:
        raise ValueError(kind)
    for g, (prefix, branches) in enumerate(groups):
        docs += [g] * (prefix + sum(branches))
        segs += [0] * prefix
        for j, n in enumerate(branches):
            segs += [j + 1] * n
    n = len(docs)
    T = -(-n // pad_to) * pad_to
    doc = torch.tensor(docs + [-1] * (T - n))
    seg = torch.tensor(segs + [-1] * (T - n))
    return doc, seg


def median_ms(fn, warmup: int = 5, repeat: int = 20) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def bench_layout(kind: str, rng: np.random.Generator, flex, dev: torch.device) -> list[list[object]]:
    rows = []
    doc, seg = layout(kind, rng, FLEX_BLOCK)
    T = len(doc)
    doc_d, seg_d = doc.to(dev), seg.to(dev)
    mask_mod = flat_mask_mod(doc_d, seg_d)
    qi, ki = torch.arange(T, device=dev)[:, None], torch.arange(T, device=dev)[None]
    mask = mask_mod(0, 0, qi, ki)  # dense (T, T): the reference's mask and the allowed pairs' count
    n_pairs = int(mask[seg_d >= 0][:, seg_d >= 0].sum())
    fwd_flop = 4 * D * H * n_pairs
    q, k, v = (torch.randn(T, H, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
    dout = torch.randn_like(q)

    block_mask = _doc_block_mask(doc_d, seg_d, mask_mod, FLEX_BLOCK)
    plan = varlen_plan(doc, seg).to(dev)
    methods = {
        "flex (block mask)": lambda q, k, v: flex(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], block_mask=block_mask
        )[0].transpose(0, 1),
        "flash varlen (ours)": lambda q, k, v: segment_attention(q, k, v, plan),
    }
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.float().transpose(0, 1), k.float().transpose(0, 1), v.float().transpose(0, 1), attn_mask=mask
    ).transpose(0, 1)
    keep = (seg >= 0).to(dev)
    for name, fn in methods.items():
        err = (fn(q, k, v).float() - ref)[keep].abs().max().item()
        qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))

        def fwd_bwd(fn=fn, qg=qg, kg=kg, vg=vg):
            fn(qg, kg, vg).backward(dout)

        with torch.no_grad():
            f_ms = median_ms(lambda fn=fn: fn(q, k, v))
        fb_ms = median_ms(fwd_bwd)
        rows.append(
            [
                kind,
                T,
                name,
                f"{err:.1e}",
                f"{f_ms:.3f}",
                f"{fwd_flop / f_ms / 1e9:.0f}",
                f"{fb_ms:.3f}",
                f"{3.5 * fwd_flop / fb_ms / 1e9:.0f}",
            ]
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layouts", nargs="+", default=["dpo", "reference", "conquer"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    dev = torch.device("cuda")
    rng = np.random.default_rng(args.seed)
    flex = torch.compile(flex_attention, dynamic=True)
    rows = []
    for kind in args.layouts:
        rows += bench_layout(kind, rng, flex, dev)
    print_table(
        f"Attention on the flat shared-prefix layout, {torch.cuda.get_device_name()}, bf16, {H} heads x {D}",
        ["layout", "tokens", "method", "max err vs fp32", "fwd ms", "fwd TFLOP/s", "fwd+bwd ms", "fwd+bwd TFLOP/s"],
        rows,
    )


if __name__ == "__main__":
    main()
