"""Probe where the 7B LoRA DPO step's time goes: the same step timed under variants that each remove one cost.

    taskset -c 0-7 python -m script.bench.probe_dpo [VARIANT ...]

Not a benchmark of the shipped path (``bench_dpo`` is): each variant changes the step to answer one question, and
prints the step's median wall time (4 warm-up steps, 6 timed, CUDA synchronised), the process's CPU time per step and
the peak memory. Variants (default: all but ``cpp-wrapper``):
- ``base``: the step as ``bench_dpo``'s ``packed`` method runs it (transformers' own gradient checkpointing);
- ``sleep``: a 2e9-cycle GPU sleep queued at the start of the step (and its length alone): if the step is bound by
  the host launching kernels, the host catches up during the sleep and the step minus the sleep gets shorter;
- ``sleep-layers``: the same sleep queued just before the decoder layers (after the vision tower and any host
  synchronisation in the embedding);
- ``dropout-off``: LoRA dropout replaced by identity (what the dropout masks cost; not a valid training setting);
- ``skip3``: the last three decoder layers not checkpointed (what recomputation costs, and their memory);
- ``inside``: gradient checkpointing traced inside each compiled layer (torch's checkpoint around the layer's call,
  compiled together) instead of around the compiled layer; ``inside-nodrop``: the same with LoRA dropout off (what
  inside checkpointing gains where torch's partitioner cannot compile it with dropout); ``inside-sac``: the same saving the attention output
  (selective checkpointing); ``inside-rng``: the same with ``functionalize_rng_ops``;
- ``cpp-wrapper``: inductor's C++ wrapper (kernel launches from C++ instead of Python);
- ``gaps``: one profiled step: kernel time, span and the GPU's idle gaps by size.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import statistics
import tempfile
import time

import torch
import torch._dynamo
from torch._dynamo.utils import counters
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from muffin import packing
from muffin.packing import BlockMask
from script.bench.bench_dpo import ours_step, pair_batches, prepare_for_dpo
from script.bench.common import build_model, make_pairs, matmul_peak_tflops

VARIANTS = [
    "base",
    "sleep",
    "sleep-layers",
    "gaps",
    "dropout-off",
    "skip3",
    "inside",
    "inside-nodrop",
    "inside-sac",
    "inside-rng",
]
SLEEP_CYCLES = int(2e9)


class Probe:
    def __init__(self, batch_size: int = 8) -> None:
        self.fam = fam = build_model("7b")
        _, self.opt = prepare_for_dpo(fam, lora=True)
        self.batches = pair_batches(fam, make_pairs(batch_size * 10, seed=batch_size), batch_size)
        self.layers = list(fam.decoder_layers())
        self.eager_calls = [layer._call_impl for layer in self.layers]

    def reset(self) -> None:
        """Back to the shipped setting: compiled layers (recompiled on the next call), all checkpointed."""
        torch._dynamo.reset()
        for layer in self.layers:
            layer._compiled_call_impl = None
            layer._packed_compiled = False
            layer.gradient_checkpointing = True

    def checkpoint_inside(self, context_fn=None) -> None:
        """Compile ``checkpoint(layer call)`` per layer, transformers' own checkpointing off."""
        packing.compile_packed_layers(self.fam)
        for layer, eager in zip(self.layers, self.eager_calls):
            layer.gradient_checkpointing = False
            kw = {"context_fn": context_fn} if context_fn else {}

            def region(*a, _f=eager, _kw=kw, **k):
                return checkpoint(_f, *a, use_reentrant=False, **_kw, **k)

            compiled = torch.compile(region, dynamic=True)

            def call(*a, _c=compiled, _e=eager, **k):
                return (_c if isinstance(k.get("attention_mask"), BlockMask) else _e)(*a, **k)

            layer._compiled_call_impl = call

    def timed(self, label: str, sleep: bool = False, warmup: int = 4) -> float:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        counters.clear()
        t0 = time.perf_counter()
        times, cpu = [], []
        for k, batch in enumerate(self.batches):
            torch.cuda.synchronize()
            t, c = time.perf_counter(), time.process_time()
            if sleep:
                torch.cuda._sleep(SLEEP_CYCLES)
            ours_step(self.fam, self.opt, batch, packed=True)
            torch.cuda.synchronize()
            if k >= warmup:
                times.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
        ms = statistics.median(times) * 1000
        print(
            f"{label:45s} {ms:7.1f} ms  cpu {statistics.median(cpu) * 1000:7.1f} ms  "
            f"peak {torch.cuda.max_memory_allocated() / 2**30:5.1f} GiB  "
            f"graph breaks {sum(counters['graph_break'].values())}  ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
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
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            prof.export_chrome_trace(f.name)
            with open(f.name) as trace_file:
                trace = json.load(trace_file)["traceEvents"]
        ks = sorted(
            (e["ts"], e["ts"] + e["dur"]) for e in trace if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
        )
        hist: collections.Counter = collections.Counter()
        end = ks[0][1]
        for a, b in ks[1:]:
            if a > end:
                hist[min(int(a - end).bit_length(), 14)] += a - end
            end = max(end, b)
        busy = sum(b - a for a, b in ks)
        print(f"kernels {len(ks)}  busy {busy / 1000:.1f} ms  span {(ks[-1][1] - ks[0][0]) / 1000:.1f} ms (profiled)")
        for k in sorted(hist):
            print(f"  idle in gaps < {2**k:6d} us: {hist[k] / 1000:7.1f} ms")


def sac_policy(ctx, op, *args, **kwargs):
    """Save the attention output (the varlen kernel's forward), recompute everything else."""
    name = str(op)
    if "varlen_attn" in name and "backward" not in name:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("variants", nargs="*", default=VARIANTS, choices=[*VARIANTS, "cpp-wrapper"])
    args = p.parse_args()
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.cuda.get_device_name()}")
    print(f"bf16 matmul peak {matmul_peak_tflops():.0f} TFLOP/s", flush=True)
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


def run_variant(probe: Probe, v: str) -> None:
    """Set up and time one variant (``probe.reset`` has put the shipped setting back)."""
    if v == "base":
        probe.timed("base (transformers' checkpointing)")
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
    elif v == "skip3":
        for layer in probe.layers[-3:]:
            layer.gradient_checkpointing = False
        probe.timed("base, last 3 layers not checkpointed")
    elif v == "inside":
        probe.checkpoint_inside()
        probe.timed("checkpoint inside the compiled layer")
    elif v == "inside-nodrop":
        with no_lora_dropout(probe):
            probe.checkpoint_inside()
            probe.timed("inside, LoRA dropout off (diagnostic)")
    elif v == "inside-sac":
        probe.checkpoint_inside(functools.partial(create_selective_checkpoint_contexts, sac_policy))
        probe.timed("inside, attention output saved")
    elif v == "inside-rng":
        torch._functorch.config.functionalize_rng_ops = True
        try:
            probe.checkpoint_inside()
            probe.timed("inside, functionalize_rng_ops")
        finally:
            torch._functorch.config.functionalize_rng_ops = False
    elif v == "cpp-wrapper":
        import torch._inductor.config as inductor_config

        inductor_config.cpp_wrapper = True
        try:
            probe.timed("base, inductor cpp_wrapper")
        finally:
            inductor_config.cpp_wrapper = False


if __name__ == "__main__":
    main()
