"""Probe where the 7B LoRA DPO step's time goes: the same step timed under variants that each remove one cost.

    taskset -c 0-7 python -m script.bench.probe_dpo [VARIANT ...]

Not a benchmark of the shipped path (``bench_dpo`` is): each variant changes the step to answer one question, and
prints the step's median wall time (4 warm-up steps, 6 timed, CUDA synchronised), the process's CPU time per step and
the peak memory of the timed steps, then each step's peak (the first steps compile). Variants (default: all but
``cpp-wrapper``):
- ``base``: the step as ``bench_dpo``'s ``packed`` method runs it (checkpointing inside the compiled layers, seeded
  LoRA dropout);
- ``sleep``: a 2e9-cycle GPU sleep queued at the start of the step (and its length alone): if the step is bound by
  the host launching kernels, the host catches up during the sleep and the step minus the sleep gets shorter;
- ``sleep-layers``: the same sleep queued just before the decoder layers (after the vision tower and any host
  synchronisation in the embedding);
- ``dropout-off``: LoRA dropout replaced by identity (what the dropout masks cost; not a valid training setting);
- ``skip3``: the last three decoder layers not checkpointed (what recomputation costs, and their memory);
- ``around``: gradient checkpointing around each compiled layer (the layer's compiled forward run again in the
  backward) instead of inside its graph; ``around-torch-dropout``: the same with LoRA dropout masks from torch's
  generator instead of the seeded hash (the shipped path before both changes; both as transformers 5.17 places its
  checkpoint, around ``__call__``: newer versions would trace it into the compiled graph again);
- ``skip4``: the last four layers not checkpointed (``--checkpoint_layers 28``);
- ``cpp-wrapper``: inductor's C++ wrapper (kernel launches from C++ instead of Python);
- ``gaps``: one profiled step: kernel time, span and the GPU's idle gaps by size.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import statistics
import time

import torch
import torch._dynamo
from torch._dynamo.utils import counters

from muffin.fast import compiled_layers, packing
from script.bench.bench_dpo import ours_step, pair_batches, prepare_for_dpo
from script.bench.common import (
    build_model,
    gpu_idle_gaps,
    make_pairs,
    matmul_burst_tflops,
    matmul_peak_tflops,
    trace_events,
)

VARIANTS = [
    "base",
    "sleep",
    "sleep-layers",
    "gaps",
    "dropout-off",
    "skip3",
    "skip4",
    "around",
    "around-torch-dropout",
]
SLEEP_CYCLES = int(2e9)


class Probe:
    def __init__(self, batch_size: int = 8) -> None:
        self.fam = fam = build_model("7b")
        _, self.opt = prepare_for_dpo(fam, lora=True)
        self.batches = pair_batches(fam, make_pairs(batch_size * 10, seed=batch_size), batch_size)
        self.layers = list(fam.decoder_layers())

    def reset(self) -> None:
        """Back to the shipped setting: compiled layers (recompiled on the next call), all checkpointed."""
        torch._dynamo.reset()
        for layer in self.layers:
            layer._compiled_call_impl = None
            layer._packed_compiled = False
            layer.gradient_checkpointing = True

    def timed(self, label: str, sleep: bool = False, warmup: int = 4) -> float:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        counters.clear()
        t0 = time.perf_counter()
        times, cpu, peaks = [], [], []
        for k, batch in enumerate(self.batches):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t, c = time.perf_counter(), time.process_time()
            if sleep:
                torch.cuda._sleep(SLEEP_CYCLES)
            ours_step(self.fam, self.opt, batch, packed=True)
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated() / 2**30)
            if k >= warmup:
                times.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
        ms = statistics.median(times) * 1000
        print(
            f"{label:45s} {ms:7.1f} ms  cpu {statistics.median(cpu) * 1000:7.1f} ms  "
            f"peak {max(peaks[warmup:]):5.1f} GiB  "
            f"graph breaks {sum(counters['graph_break'].values())}  ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
        print(f"{'':45s} peak GiB by step (warm-up first): {' '.join(f'{x:.1f}' for x in peaks)}", flush=True)
        return ms

    def sleep_alone(self) -> None:
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        torch.cuda._sleep(SLEEP_CYCLES)
        e.record()
        torch.cuda.synchronize()
        print(f"{'GPU sleep alone':45s} {s.elapsed_time(e):7.1f} ms", flush=True)

    def gaps(self) -> None:
        """One profiled step (after warm steps): kernel time, span, and the idle gaps between kernels by size."""
        from torch.profiler import ProfilerActivity, profile

        self.timed("base (warming up the profiled step)")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            ours_step(self.fam, self.opt, self.batches[0], packed=True)
            torch.cuda.synchronize()
        ks, gaps = gpu_idle_gaps(trace_events(prof))
        hist: collections.Counter = collections.Counter()
        for g, _ in gaps:
            hist[min(int(g).bit_length(), 14)] += g
        busy = sum(b - a for a, b in ks)
        print(f"kernels {len(ks)}  busy {busy / 1000:.1f} ms  span {(ks[-1][1] - ks[0][0]) / 1000:.1f} ms (profiled)")
        for k in sorted(hist):
            print(f"  idle in gaps < {2**k:6d} us: {hist[k] / 1000:7.1f} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("variants", nargs="*", default=VARIANTS, choices=[*VARIANTS, "cpp-wrapper"])
    args = p.parse_args()
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.cuda.get_device_name()}")
    burst = matmul_burst_tflops()
    print(f"bf16 matmul peak {matmul_peak_tflops():.0f} TFLOP/s sustained ({burst:.0f} in a burst)", flush=True)
    probe = Probe()
    for v in args.variants:
        probe.reset()
        try:
            run_variant(probe, v)
        except Exception as e:  # a variant the installed torch cannot compile: say so and go on
            last = (str(e).strip().splitlines() or [""])[-1][:200]
            print(f"{v:45s} failed: {type(e).__name__}: {last}", flush=True)


@contextlib.contextmanager
def no_lora_dropout(probe: Probe):
    """LoRA dropout replaced by identity while the block runs."""
    saved = {}
    for n, m in probe.fam.model.named_modules():
        if hasattr(m, "lora_dropout"):
            saved[n] = dict(m.lora_dropout)
            for key in m.lora_dropout:
                m.lora_dropout[key] = torch.nn.Identity()
    try:
        yield
    finally:
        for n, m in probe.fam.model.named_modules():
            for key, d in saved.get(n, {}).items():
                m.lora_dropout[key] = d


@contextlib.contextmanager
def checkpointing_around(torch_dropout: bool):
    """transformers' own checkpointing around the compiled layer (transformers 5.17 places it around ``__call__``;
    on newer versions it would trace into the compiled graph), optionally with torch's dropout (no seeds set)."""
    saved = packing.checkpointing_in_compiled_layers, compiled_layers.seeded_modules
    packing.checkpointing_in_compiled_layers = lambda family: contextlib.nullcontext()
    if torch_dropout:
        compiled_layers.seeded_modules = lambda module: []
    try:
        yield
    finally:
        packing.checkpointing_in_compiled_layers, compiled_layers.seeded_modules = saved


def run_variant(probe: Probe, v: str) -> None:
    """Set up and time one variant (``probe.reset`` has put the shipped setting back)."""
    if v == "base":
        probe.timed("base (as shipped)")
    elif v == "sleep":
        probe.sleep_alone()
        probe.timed("base, GPU sleep queued first", sleep=True)
    elif v == "sleep-layers":
        probe.sleep_alone()
        real = type(probe.fam).decoder_hidden

        def slept(self, *a, _real=real, **k):
            torch.cuda._sleep(SLEEP_CYCLES)
            return _real(self, *a, **k)

        type(probe.fam).decoder_hidden = slept
        try:
            probe.timed("base, GPU sleep queued before the layers")
        finally:
            type(probe.fam).decoder_hidden = real
    elif v == "gaps":
        probe.gaps()
    elif v == "dropout-off":
        with no_lora_dropout(probe):
            probe.timed("base, LoRA dropout off (diagnostic)")
    elif v in ("skip3", "skip4"):
        n = int(v[-1])
        for layer in probe.layers[-n:]:
            layer.gradient_checkpointing = False
        probe.timed(f"base, last {n} layers not checkpointed")
    elif v in ("around", "around-torch-dropout"):
        with checkpointing_around(torch_dropout=v == "around-torch-dropout"):
            probe.timed("checkpoint around the compiled layers" + (", torch's dropout" if "torch" in v else ""))
    elif v == "cpp-wrapper":
        import torch._inductor.config as inductor_config

        inductor_config.cpp_wrapper = True
        try:
            probe.timed("base, inductor cpp_wrapper")
        finally:
            inductor_config.cpp_wrapper = False


if __name__ == "__main__":
    main()
