"""Profile one DPO training step (torch.profiler) and print the top operators by CUDA and CPU time.

python -m script.bench.profile_dpo --shape 1.5b [--lora] [--batch-size 8] [--plain] [--attention auto|dense]

Also prints the step's wall time against the summed time of its GPU kernels (how much of the step the GPU idles),
the kernel time by kind (matmuls, attention, inductor's fused kernels, eager elementwise kernels, copies) and the
longest idle gaps.
"""

from __future__ import annotations

import argparse
import collections
import time

import torch
from torch.profiler import ProfilerActivity, profile

from script.bench.bench_dpo import ours_step, pair_batches, prepare_for_dpo
from script.bench.common import GPU_EVENTS, build_model, gpu_idle_gaps, make_pairs, trace_events


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="1.5b", choices=["7b", "1.5b"])
    p.add_argument("--lora", action="store_true")
    p.add_argument("--plain", action="store_true")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--attention", default="auto", choices=["auto", "flex", "varlen", "dense"], help="family.fast.packed_attention"
    )
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--gaps", type=int, default=12, help="print the N longest GPU idle gaps and the CPU ops under them")
    args = p.parse_args()
    fam = build_model(args.shape)
    _, opt = prepare_for_dpo(fam, args.lora)
    fam.fast.packed_attention = args.attention
    batches = pair_batches(fam, make_pairs(args.batch_size * 3), args.batch_size)
    for b in batches[:2]:
        ours_step(fam, opt, b, packed=not args.plain)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        ours_step(fam, opt, batches[2], packed=not args.plain)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    events = prof.key_averages()
    print(events.table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=70))
    print(events.table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=70))
    kernels = sum(e.self_device_time_total for e in events) / 1e6
    print(f"step wall {wall * 1000:.0f} ms (profiled); summed GPU self time {kernels * 1000:.0f} ms")
    trace = trace_events(prof)
    print_kinds(trace)
    if args.gaps:
        print_gaps(trace, args.gaps)


KINDS = [  # first match wins (FlashAttention's names hold cutlass types); Hopper's names: cuBLAS's nvjet/xmma, FA2
    ("attention", ("flash", "fmha", "attention")),
    ("matmul", ("nvjet", "gemm", "xmma", "cutlass", "gemv", "sm90_")),
    ("inductor (triton)", ("triton",)),
    ("eager elementwise / reduce", ("elementwise", "reduce", "vectorized", "index", "scatter", "gather", "softmax")),
]


def kind_of(event: dict) -> str:
    if event.get("cat") != "kernel":
        return "copy / memset"
    name = event["name"].lower()
    return next((kind for kind, keys in KINDS if any(k in name for k in keys)), "other")


def print_kinds(trace: list[dict], top: int = 3) -> None:
    """GPU time by kind of kernel, with each kind's three longest kernels by summed time."""
    total, names = collections.Counter(), collections.defaultdict(collections.Counter)
    for e in trace:
        if e.get("cat") in GPU_EVENTS:
            kind = kind_of(e)
            total[kind] += e["dur"]
            names[kind][e["name"][:60]] += e["dur"]
    busy = sum(total.values())
    print(f"GPU kernel time by kind (summed {busy / 1000:.1f} ms):")
    for kind, us in total.most_common():
        tops = ", ".join(f"{n} {t / 1000:.1f}" for n, t in names[kind].most_common(top))
        print(f"  {kind:28s} {us / 1000:8.1f} ms {100 * us / busy:5.1f}%   ({tops})")


def print_gaps(trace: list[dict], n: int) -> None:
    """The longest stretches with no kernel on the GPU, each with the CPU ops running at its start (innermost
    last): where the step waits for the host."""
    _, gaps = gpu_idle_gaps(trace)
    cpu = [e for e in trace if e.get("cat") == "cpu_op"]
    idle = sum(g for g, _ in gaps)
    print(f"GPU idle between its first and last kernel: {idle / 1000:.1f} ms in {len(gaps)} gaps")
    for g, t in sorted(gaps, reverse=True)[:n]:
        stack = sorted((e for e in cpu if e["ts"] <= t <= e["ts"] + e["dur"]), key=lambda e: e["ts"])
        names = " > ".join(e["name"][:40] for e in stack[-4:])
        print(f"  {g / 1000:7.2f} ms  {names}")


if __name__ == "__main__":
    main()
