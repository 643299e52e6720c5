"""Benchmark the inference stages against the original's way on one GPU and print a table.

    python script/bench/bench_inference.py --shape 7b

1. Reference log-probs: pairs/s, packed pairs in batches vs one pair at a time as two padded sequences (original).
2. Conquer (labeler yes/no): claims/s, each image encoded once with its questions packed behind it vs one question
   per forward pass with the image re-encoded each time (original).
3. Candidate sampling: answers/s for 10 samples per prompt, all samples of several prompts in one batch vs the
   prompt repeated 10 times in batches of 8 (original); decode tokens/s against the memory-bandwidth bound.
Each of our paths is first checked against the plain path on the same inputs. Ours are timed over several batches
(64 pairs, 32 images x 40 questions by default), as the stages run: the CPU side of each batch (tokenising, image
preprocessing, packing) is prepared in the background while the GPU runs the previous one. ``--stages`` picks.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from muffin.decoding import CANDIDATE_SAMPLING, GREEDY
from muffin.family import Sample
from muffin.feedback.autocheck import effective_batch_size
from muffin.inference import answer_logps, generate, prefetched, yes_no_probs
from muffin.packing import prepare_answer_logps, run_answer_logps
from script.bench.bench_dpo import lm_matmul_params
from script.bench.common import (
    build_model,
    make_pairs,
    matmul_peak_tflops,
    memory_bandwidth_gbs,
    print_table,
    timeit,
    words,
)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="7b", choices=["7b", "1.5b"])
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--ref-batches", type=int, nargs="+", default=[8, 32], help="pairs per packed batch (a row each)")
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--questions-per-image", type=int, default=40)
    p.add_argument(
        "--conquer-batches", type=int, nargs="+", default=[16, 320], help="questions per packed batch (a row each)"
    )
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument(
        "--stages",
        nargs="+",
        default=["reference", "conquer", "sampling"],
        choices=["reference", "conquer", "sampling"],
    )
    return p


def main() -> None:
    args = make_parser().parse_args()
    fam = build_model(args.shape)
    rows = []
    if "reference" in args.stages:
        rows += reference_rows(fam, args)
    if "conquer" in args.stages:
        rows += conquer_rows(fam, args)
    if "sampling" in args.stages:
        rows += sampling_rows(fam, args)
    print_table(
        f"Inference stages, LLaVA 1.5 {args.shape} shape, bf16, {torch.cuda.get_device_name()}",
        ["stage", "unit", "original's way", "ours", "speed-up", "check / note"],
        rows,
    )


def reference_rows(fam, args) -> list[list[str]]:
    rows = []
    pairs = make_pairs(args.pairs)
    flat = [s for p in pairs for s in p]
    fast = answer_logps(fam, flat[:8], batch_size=8, packed=True)
    plain = answer_logps(fam, flat[:8], batch_size=2, packed=False)
    err = max(abs(a.sum - b.sum) / max(1.0, abs(b.sum)) for a, b in zip(fast, plain))
    n_base = min(8, args.pairs)
    t_base = timeit(lambda: [answer_logps(fam, list(p), batch_size=2, packed=False) for p in pairs[:n_base]])
    base = n_base / t_base.median_s

    def script_layout() -> None:
        """As RLHF-V/RLAIF-V's muffin_inference_logp.py runs: one answer per forward pass (chosen, then rejected),
        full logits, the next answer prepared ahead (its DataLoader workers)."""
        answers = [s for p in pairs[:n_base] for s in p]
        for prep in prefetched(lambda s: prepare_answer_logps(fam, [[s]], packed=False), answers):
            run_answer_logps(fam, prep).sums.tolist()

    base_script = n_base / timeit(script_layout).median_s
    # the floor: our LM tokens (each pair's image + prompt once) x 2 N FLOPs at the measured matmul peak
    peak = matmul_peak_tflops()
    n_lm = lm_matmul_params(fam.model)
    tokens = 0
    for c, r in pairs:
        enc = fam.encode([c, r])
        tokens += int(enc["attention_mask"].sum()) - int(
            (enc["attention_mask"][0].bool() & ~enc["answer_mask"][0].bool()).sum()
        )
    floor_rate = args.pairs / (2 * n_lm * tokens / (peak * 1e12))
    for rb in args.ref_batches:
        t_fast = timeit(lambda rb=rb: answer_logps(fam, flat, batch_size=2 * rb, packed=True))
        ours = args.pairs / t_fast.median_s
        rows.append(
            [
                f"reference log-probs, {rb} pairs/batch",
                "pairs/s",
                f"{base:.2f}",
                f"{ours:.2f}",
                f"{ours / base:.1f}x",
                f"max rel. diff of sums {err:.1e}; FLOP floor {floor_rate:.1f} pairs/s at {peak:.0f} TFLOP/s "
                f"= at most {floor_rate / base:.1f}x the original's way; the original script's layout (one answer "
                f"per pass, prepared ahead) {base_script:.2f} pairs/s = {ours / base_script:.1f}x",
            ]
        )
    return rows


def conquer_rows(fam, args) -> list[list[str]]:
    rows = []
    rng = np.random.default_rng(1)
    imgs = [p[0].image for p in make_pairs(args.images, seed=2)]
    qs = [
        Sample(im, "Is there " + words(rng, int(rng.integers(5, 12))) + " in the image?")
        for im in imgs
        for _ in range(args.questions_per_image)
    ]
    a = yes_no_probs(fam, qs[:16], batch_size=16, packed=True)
    b = yes_no_probs(fam, qs[:16], batch_size=1, packed=False)
    err = float(np.abs(np.array(a) - np.array(b)).max())
    n_base = 32
    t_base = timeit(lambda: yes_no_probs(fam, qs[:n_base], batch_size=1, packed=False))
    base = n_base / t_base.median_s
    default = effective_batch_size(fam, 0)
    runs = [(f"as the conquer stage calls it (prompts batched to {default} questions)", default)]
    runs += [(f"{cb} questions/batch", cb) for cb in args.conquer_batches if cb != default]
    for label, cb in runs:
        t_fast = timeit(lambda cb=cb: yes_no_probs(fam, qs, batch_size=cb, packed=True))
        ours = len(qs) / t_fast.median_s
        rows.append(
            [
                f"conquer (yes/no), {label}",
                "claims/s",
                f"{base:.1f}",
                f"{ours:.1f}",
                f"{ours / base:.1f}x",
                f"max |dP| {err:.1e}; {args.questions_per_image} questions per image",
            ]
        )
    return rows


def sampling_rows(fam, args) -> list[list[str]]:
    rows = []
    dec = CANDIDATE_SAMPLING.replace(max_new_tokens=args.max_new_tokens)
    prompts = [Sample(p[0].image, p[0].question) for p in make_pairs(args.prompts, seed=3)]
    reps = [s for s in prompts for _ in range(args.samples)]
    seeds = list(range(len(reps)))
    n_base = 2 * args.samples
    t_base = timeit(lambda: generate(fam, reps[:n_base], dec, seeds=seeds[:n_base], batch_size=8), warmup=0, repeat=1)
    t_fast = timeit(lambda: generate(fam, reps, dec, seeds=seeds, batch_size=len(reps)), warmup=0, repeat=1)
    base, ours = n_base / t_base.median_s, len(reps) / t_fast.median_s
    bw = memory_bandwidth_gbs()
    weight_bytes = sum(p.numel() * p.element_size() for p in fam.model.parameters())
    bound = len(reps) * bw * 1e9 / weight_bytes  # tokens/s if each decode step only read the weights once
    tok_s = len(reps) * args.max_new_tokens / t_fast.median_s
    rows.append(
        [
            "sampling (10/prompt)",
            "answers/s",
            f"{base:.2f}",
            f"{ours:.2f}",
            f"{ours / base:.1f}x",
            f"decode {tok_s:.0f} tok/s vs weight-read bound {bound:.0f} tok/s at batch {len(reps)} ({bw:.0f} GB/s)",
        ]
    )
    # decode step cost: greedy vs seeded sampling (is the sampler or generate's loop the bottleneck?)
    for name, d, sd in (
        ("greedy", GREEDY.replace(max_new_tokens=32), None),
        ("seeded T=0.7", dec.replace(max_new_tokens=32), seeds),
    ):
        t = timeit(lambda d=d, sd=sd: generate(fam, reps, d, seeds=sd, batch_size=len(reps)), warmup=1, repeat=1)
        rows.append(
            [
                f"decode step, {name}",
                "ms/step",
                "",
                f"{1000 * t.median_s / 32:.1f}",
                "",
                f"batch {len(reps)}, 32 new tokens incl. prefill",
            ]
        )
    return rows


if __name__ == "__main__":
    main()
