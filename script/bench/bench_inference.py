"""Benchmark the inference stages against the original's way on one GPU and print a table.

    python script/bench/bench_inference.py --shape 7b

1. Reference log-probs: pairs/s, packed pairs in batches vs one pair at a time as two padded sequences (original).
2. Conquer (labeler yes/no): claims/s, each image encoded once with its questions packed behind it vs one question
   per forward pass with the image re-encoded each time (original).
3. Candidate sampling: answers/s for 10 samples per prompt, all samples of several prompts in one batch (a static
   KV cache, each prompt prefilled once: ``muffin.fast.generation``) vs the prompt repeated 10 times in batches of 8 with
   transformers' default cache (original); decode tokens/s against the memory-bandwidth bound.
Each of our paths is first checked against the plain path on the same inputs. Ours are timed over several batches
(64 pairs, 32 images x 40 questions by default), as the stages run: the CPU side of each batch (tokenising, image
preprocessing, packing) is prepared in the background while the GPU runs the previous one. ``--stages`` picks.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from muffin.decoding import CANDIDATE_SAMPLING, GREEDY
from muffin.family import Sample
from muffin.fast.packing import prepare_answer_logps, run_answer_logps
from muffin.feedback.autocheck import effective_batch_size
from muffin.inference import answer_logps, generate, prefetched, yes_no_probs
from script.bench.bench_dpo import lm_matmul_params
from script.bench.common import (
    build_model,
    make_pairs,
    matmul_peak_tflops,
    memory_bandwidth_gbs,
    print_table,
    timeit,
    words,
    write_pair_dataset,
)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="7b", choices=["7b", "1.5b"])
    p.add_argument("--pairs", type=int, default=128)
    p.add_argument("--ref-batches", type=int, nargs="+", default=[8, 32], help="pairs per reference batch")
    p.add_argument(
        "--ref-workers",
        type=int,
        nargs="+",
        default=[0],
        help="reference stage: its num_workers (0: batches prepared in a thread; N: N forked loader processes)",
    )
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


def log(msg: str) -> None:
    """Progress on stderr with the time (the table comes last on stdout)."""
    import sys
    import time

    print(time.strftime("%H:%M:%S"), msg, file=sys.stderr, flush=True)


def reference_rows(fam, args) -> list[list[str]]:
    """The reference stage as it runs (``muffin.train.reference.score_rows``: pair files read from disk, batches
    prepared in the background) on two pair sets: the pipeline's shape (two pairs per prompt drawn from its ten
    answers, as the original's ``pair_diff1_samp2``) and independent pairs (one per prompt). The original's way is
    timed on the same pairs three ways (the "original's way" column, in this order): as its
    ``muffin_inference_logp.py`` lays the work out (one answer per forward pass, full logits, the next pair read and
    prepared ahead, here in a thread); a pair's chosen and rejected as one padded batch of two prepared in line; and
    the first layout's GPU work alone, its inputs prepared before the clock starts (as if its 5 loader processes
    hid every CPU cost). Our rows: the stage as it runs (decoder layers compiled) and with the layers eager."""
    import tempfile

    from muffin.train.data import PreferenceDataset

    rows = []
    peak = matmul_peak_tflops()
    n_lm = lm_matmul_params(fam.model)
    tmp = Path(tempfile.mkdtemp(prefix="bench-ref-"))
    sets = [
        ("pipeline pairs (2 per prompt of 10 answers)", dict(per_prompt=2, samples=10)),
        ("independent pairs (1 per prompt)", dict(per_prompt=1, samples=2)),
    ]
    for label, shape in sets:
        ds = PreferenceDataset(write_pair_dataset(tmp / str(shape["per_prompt"]), args.pairs, seed=5, **shape))
        rows += _reference_set(fam, args, label, ds, peak, n_lm)
    return rows


def _reference_set(fam, args, label: str, ds, peak: float, n_lm: int) -> list[list[str]]:
    """The rows of one pair set (see ``reference_rows``)."""
    from muffin.train.reference import encode_by_prompt, score_rows

    rows = []
    every = list(range(len(ds)))
    recs = [ds[i] for i in every]
    # check: the stage's numbers against each answer scored on its own (plain path, full logits)
    n_check = min(8, len(ds))
    log(f"{label}: checking against single answers (the first call compiles the decoder layers)")
    stage = dict(score_rows(fam, ds, every[:n_check], max_length=2048, batch_size=8))
    singles = answer_logps(
        fam,
        [
            Sample(recs[i]["image"], recs[i]["question"], recs[i][k])
            for i in every[:n_check]
            for k in ("chosen", "rejected")
        ],
        batch_size=1,
        packed=False,
    )
    err = max(
        abs(stage[i][3 * k] - singles[2 * i + k].sum) / max(1.0, abs(singles[2 * i + k].sum))
        for i in range(n_check)
        for k in (0, 1)
    )
    n_base = min(8, len(ds))

    def padded_pair() -> None:
        for i in every[:n_base]:
            rec = ds[i]
            answer_logps(
                fam,
                [Sample(rec["image"], rec["question"], rec[k]) for k in ("chosen", "rejected")],
                batch_size=2,
                packed=False,
            )

    def script_layout() -> None:
        for preps in prefetched(prep_pair, every[:n_base]):
            for p in preps:
                run_answer_logps(fam, p).sums.tolist()

    def prep_pair(i: int) -> list:
        rec = ds[i]
        return [
            prepare_answer_logps(fam, [[Sample(rec["image"], rec["question"], rec[a])]], packed=False)
            for a in ("chosen", "rejected")
        ]

    # the original layout's GPU work alone: its inputs prepared before the clock starts, as if its 5 loader
    # processes hid all of the CPU work (the strongest form of the original's way)
    prepared = [prep_pair(i) for i in every[:n_base]]

    def script_layout_gpu_only() -> None:
        for preps in prepared:
            for p in preps:
                run_answer_logps(fam, p).sums.tolist()

    base_pair = n_base / timeit(padded_pair).median_s
    base_script = n_base / timeit(script_layout).median_s
    base_gpu = n_base / timeit(script_layout_gpu_only).median_s
    log(f"{label}: baselines {base_script:.2f} / {base_pair:.2f} / {base_gpu:.2f} pairs/s")
    # FLOP floor: the LM tokens the stage feeds (each prompt's image + question once, each distinct answer
    # once), 2 N FLOPs each, at the measured matmul peak; and the tokens of the original's layout
    ours_tokens = int(
        (encode_by_prompt(fam, recs, [ds.prompt_key(i) for i in every], 2048).plan.packed.segment >= 0).sum()
    )
    base_tokens = sum(
        int(fam.encode([Sample(r["image"], r["question"], r[k])])["attention_mask"].sum())
        for r in recs
        for k in ("chosen", "rejected")
    )
    floor_rate = len(ds) / (2 * n_lm * ours_tokens / (peak * 1e12))
    runs = [(f"{rb} pairs/batch", dict(batch_size=rb)) for rb in args.ref_batches]
    runs += [
        (
            f"{args.ref_batches[0]} pairs/batch, {w} loader processes",
            dict(batch_size=args.ref_batches[0], num_workers=w),
        )
        for w in args.ref_workers
        if w > 0
    ]
    runs += [
        (f"{args.ref_batches[0]} pairs/batch, decoder layers eager", dict(batch_size=args.ref_batches[0], eager=True))
    ]
    for name, kw in runs:
        fam.fast.compile_layers = False if kw.pop("eager", False) else "auto"
        t = timeit(lambda kw=kw: score_rows(fam, ds, every, max_length=2048, **kw))
        fam.fast.compile_layers = "auto"
        ours = len(ds) / t.median_s
        log(f"{label}, {name}: {ours:.2f} pairs/s")
        rows.append(
            [
                f"reference log-probs, {label}, {name}",
                "pairs/s",
                f"{base_script:.2f} / {base_pair:.2f} / {base_gpu:.2f}",
                f"{ours:.2f}",
                f"{ours / base_script:.1f}x / {ours / base_pair:.1f}x / {ours / base_gpu:.1f}x",
                f"max rel. diff of sums vs single answers {err:.1e}; LM tokens {base_tokens} -> {ours_tokens} "
                f"({base_tokens / ours_tokens:.2f}x fewer); FLOP floor {floor_rate:.1f} pairs/s at {peak:.0f} "
                f"TFLOP/s = at most {floor_rate / base_script:.1f}x / {floor_rate / base_pair:.1f}x / "
                f"{floor_rate / base_gpu:.1f}x",
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


def original_generate(fam, samples: list[Sample], dec, batch_size: int) -> None:
    """The original's sampling: each prompt repeated in the batch, batches of ``batch_size``, transformers'
    ``generate`` with its default (dynamic) cache and its own sampler."""
    for i in range(0, len(samples), batch_size):
        inputs = fam._inputs(fam.encode(samples[i : i + batch_size], for_generation=True))
        with torch.inference_mode():
            fam.model.generate(
                **inputs, pad_token_id=fam.pad_id, eos_token_id=fam.tokenizer.eos_token_id, **dec.to_generate_kwargs()
            )


def sampling_rows(fam, args) -> list[list[str]]:
    """10 samples per prompt: the original's way (batches of 8) against ours (every sample of the prompts in one
    batch: static cache, each prompt prefilled once), and ours with the prompts repeated in the batch instead."""
    rows = []
    dec = CANDIDATE_SAMPLING.replace(max_new_tokens=args.max_new_tokens)
    prompts = [Sample(p[0].image, p[0].question) for p in make_pairs(args.prompts, seed=3)]
    reps = [s for s in prompts for _ in range(args.samples)]
    seeds = list(range(len(reps)))
    n_base = 2 * args.samples

    # check: one prefill per prompt gives the repeated batch's greedy answers (bf16: the prefill runs fewer rows,
    # so its matmuls may round differently and a near-tie may flip on random weights)
    greedy = GREEDY.replace(max_new_tokens=32)
    shared_g = generate(fam, reps, greedy, batch_size=len(reps))
    plain_g = generate(fam, reps, greedy, batch_size=len(reps), share_prefix=False)
    same = sum(a == b for a, b in zip(shared_g, plain_g))
    log(f"sampling: greedy answers equal with and without the shared prefill: {same}/{len(reps)}")
    t_base = timeit(lambda: original_generate(fam, reps[:n_base], dec, batch_size=8), warmup=0, repeat=1)
    base = n_base / t_base.median_s
    bw = memory_bandwidth_gbs()
    weight_bytes = sum(p.numel() * p.element_size() for p in fam.model.parameters())
    bound = len(reps) * bw * 1e9 / weight_bytes  # tokens/s if each decode step only read the weights once
    for name, run in (
        ("sampling (10/prompt)", lambda: generate(fam, reps, dec, seeds=seeds, batch_size=len(reps))),
        (
            "sampling (10/prompt), prompts repeated in the batch",
            lambda: generate(fam, reps, dec, seeds=seeds, batch_size=len(reps), share_prefix=False),
        ),
    ):
        t = timeit(run, warmup=0, repeat=1)
        ours = len(reps) / t.median_s
        log(f"{name}: {ours:.2f} answers/s (original's way {base:.2f})")
        note = (
            f"decode {len(reps) * args.max_new_tokens / t.median_s:.0f} tok/s vs weight-read bound {bound:.0f} tok/s"
        )
        note += f" at batch {len(reps)} ({bw:.0f} GB/s)"
        if not rows:
            note += f"; greedy answers equal to the repeated batch's: {same}/{len(reps)}"
        rows.append([name, "answers/s", f"{base:.2f}", f"{ours:.2f}", f"{ours / base:.1f}x", note])
    # decode step cost: greedy vs seeded sampling (is the sampler or generate's loop the bottleneck?)
    for name, d, sd in (
        ("greedy", greedy, None),
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
