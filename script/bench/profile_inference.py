"""Where the time of the packed inference stages goes: reference log-probs and conquer, phase by phase.

    python -m script.bench.profile_inference --shape 7b [--pairs 8] [--questions 256]

Times each phase of one packed batch with the GPU synchronised around it (CPU encoding, packing, the block mask,
the vision tower, the decoder, the output head), then the whole call, and prints the summed GPU kernel time of a
torch.profiler trace of the whole call against its wall time (how long the GPU idles).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from muffin.family import Sample
from muffin.fast.attention import flat_kernel, flat_layout, install_block_mask_attention, use_flat_row
from muffin.fast.layout import plan_batch_logps, plan_next_token
from muffin.inference import answer_logps, yes_no_probs
from script.bench.common import build_model, make_pairs, print_table, words


def _timed(rows: list, stage: str, name: str, fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    rows.append([stage, name, f"{1000 * (time.perf_counter() - t):.1f}"])
    return out


def phases(fam, rows: list, stage: str, samples: list[Sample], sizes: list[int], for_generation: bool) -> None:
    """The packed path's phases for groups of ``sizes`` consecutive samples, with the functions that
    ``run_next_token`` / ``run_batch_logps`` run (planning includes the latter's label bookkeeping)."""
    batch = _timed(
        rows,
        stage,
        "encode (tokenise, image preprocessing)",
        lambda: fam.encode(samples, for_generation=for_generation),
    )
    starts = [sum(sizes[:g]) for g in range(len(sizes))]
    groups = [list(range(s, s + n)) for s, n in zip(starts, sizes)]
    if for_generation:
        packed = _timed(rows, stage, "plan (python)", lambda: plan_next_token(fam, batch, groups)[0])
    else:
        packed = _timed(rows, stage, "plan (python)", lambda: plan_batch_logps(fam, batch, groups).packed)
    dev = fam.device
    assert use_flat_row(fam, dev)
    install_block_mask_attention()
    kernel = flat_kernel(fam, packed, dev, fam.output_head().weight.dtype)
    ids, pos, mask, where = _timed(
        rows, stage, f"flat layout + {kernel} mask", lambda: flat_layout(packed, dev, fam.pad_id, kernel)
    )
    feats = _timed(rows, stage, "vision tower + projector", lambda: fam.image_features(batch, starts))
    emb = fam.embed_tokens(ids)
    is_image = ids == fam.image_token_id
    emb = emb.masked_scatter(is_image[..., None].expand_as(emb), torch.cat(feats).to(emb.dtype))
    hidden = _timed(rows, stage, f"decoder ({ids.shape[1]} tokens)", lambda: fam.decoder_hidden(emb, mask, pos))
    _timed(rows, stage, "output head, all tokens (upper bound)", lambda: fam.output_head()(hidden[0, :2048]))


def trace(fn) -> tuple[float, float]:
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    gpu = sum(e.self_device_time_total for e in prof.key_averages()) / 1e6
    return wall, gpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="7b", choices=["7b", "1.5b"])
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--questions", type=int, default=256)
    p.add_argument("--questions-per-image", type=int, default=40)
    args = p.parse_args()
    fam = build_model(args.shape)
    rows: list[list[str]] = []
    with torch.inference_mode():
        pairs = make_pairs(args.pairs)
        flat = [s for pr in pairs for s in pr]
        answer_logps(fam, flat, batch_size=len(flat))  # warm-up (compiles FlexAttention)
        for _ in range(2):
            rows = [r for r in rows if r[0] != "reference"]
            phases(fam, rows, "reference", flat, [2] * args.pairs, False)
        _timed(rows, "reference", "whole call (answer_logps)", lambda: answer_logps(fam, flat, batch_size=len(flat)))
        wall, gpu = trace(lambda: answer_logps(fam, flat, batch_size=len(flat)))
        rows.append(["reference", "profiled call: wall / summed GPU kernels", f"{1000 * wall:.1f} / {1000 * gpu:.1f}"])

        rng = np.random.default_rng(1)
        n_img = -(-args.questions // args.questions_per_image)
        imgs = [pr[0].image for pr in make_pairs(n_img, seed=2)]
        qs = [
            Sample(im, "Is there " + words(rng, int(rng.integers(5, 12))) + " in the image?")
            for im in imgs
            for _ in range(args.questions_per_image)
        ][: args.questions]
        sizes = [sum(1 for q in qs if q.image is im) for im in imgs]
        yes_no_probs(fam, qs, batch_size=len(qs))
        for _ in range(2):
            rows = [r for r in rows if r[0] != "conquer"]
            phases(fam, rows, "conquer", qs, sizes, True)
        _timed(rows, "conquer", "whole call (yes_no_probs)", lambda: yes_no_probs(fam, qs, batch_size=len(qs)))
        wall, gpu = trace(lambda: yes_no_probs(fam, qs, batch_size=len(qs)))
        rows.append(["conquer", "profiled call: wall / summed GPU kernels", f"{1000 * wall:.1f} / {1000 * gpu:.1f}"])
    print_table(
        f"Packed inference phases, LLaVA 1.5 {args.shape} shape, {args.pairs} pairs / {args.questions} questions, "
        f"{torch.cuda.get_device_name()}",
        ["stage", "phase", "ms"],
        rows,
    )


if __name__ == "__main__":
    main()
