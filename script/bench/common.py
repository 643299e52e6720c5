"""Shared pieces of the GPU benchmarks: real-shape random LLaVA models, RLAIF-V-like pairs, timing, peaks.

Not a test: the benchmark scripts print tables. Shapes follow LLaVA 1.5 7B (CLIP ViT-L/14-336, 576 image tokens,
Llama 7B: hidden 4096, 32 layers, vocab 32000 + 64 padding rows as llava-hf) with random weights.
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from llava.family import LlavaFamily
from llava.preprocess import make_image_processor
from llava.tiny import tiny_llava_tokenizer
from muffin.family import Sample
from utils.cuda import configure_attention_backends

SHAPES = {
    # LLaVA 1.5 7B: Llama-2-7B body (rms_norm_eps as llava-1.5-7b-hf publishes it; LlamaConfig's default is 1e-6)
    "7b": dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, rms_norm_eps=1e-5
    ),
    # ~1.5B of the same family (6 Llama layers of width 4096 + CLIP ViT-L/336), for full fine-tuning on one GPU
    "1.5b": dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=6, num_attention_heads=32, rms_norm_eps=1e-5
    ),
}
WORDS = (
    "the a image shows red blue green small large car dog cat person table chair street tree sky building "
    "window road sign light two three several near left right behind front top bottom white black wooden "
    "standing sitting parked next to with and on in of is are there background foreground"
).split()


CLIP_L336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)


def llava15_config(tok: Any, text: dict[str, int], vision: dict[str, int] = CLIP_L336) -> LlavaConfig:
    """LLaVA 1.5's config at the given sizes: a CLIP ViT/14-336 tower (penultimate layer, CLS dropped), the 32064-row
    Llama vocabulary, ``tok``'s special ids."""
    return LlavaConfig(
        vision_config=CLIPVisionConfig(
            image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu", **vision
        ),
        text_config=LlamaConfig(
            vocab_size=32064,
            max_position_embeddings=4096,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            **text,
        ),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        pad_token_id=tok.pad_token_id,
    )


def build_model(
    shape: str = "7b", device: str = "cuda", dtype: torch.dtype = torch.bfloat16, attn: str = "sdpa", seed: int = 0
) -> LlavaFamily:
    """A random LLaVA 1.5 model of the given shape wrapped in our family (tokenizer: a small offline BPE whose ids
    are a subset of the 32064-row vocabulary; compute and memory are those of the real model). The weights are drawn
    under ``seed`` (through run 11 they were not seeded: checks such as greedy agreement varied between runs)."""
    tok = tiny_llava_tokenizer(corpus=[" ".join(WORDS)] * 50, vocab_size=400)
    cfg = llava15_config(tok, SHAPES[shape])
    cfg._attn_implementation = attn
    configure_attention_backends()  # what load_family does on a GPU
    model = random_model(LlavaForConditionalGeneration, cfg, dtype=dtype, device=device, seed=seed).eval()
    return LlavaFamily(model, tok, make_image_processor(336), max_length=2048)


def random_model(model_class, cfg, *, dtype: torch.dtype, device, seed: int):
    """``model_class(cfg)`` with its weights drawn under ``seed``, built directly on ``device`` in ``dtype`` (a 7B
    model never passes through host memory in float32)."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(seed)
        with torch.device(device):
            return model_class(cfg)
    finally:
        torch.set_default_dtype(prev)


def words(rng: np.random.Generator, n: int) -> str:
    return " ".join(rng.choice(WORDS, n))


def random_image(rng: np.random.Generator) -> Image.Image:
    """A noise image of 300-639 px a side (height drawn first), as the benchmarks' prompts carry."""
    size = (int(rng.integers(300, 640)), int(rng.integers(300, 640)))
    return Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))


def make_pairs(
    n: int, seed: int = 0, prompt_words: int = 30, answer_words: tuple[int, int] = (100, 250)
) -> list[tuple[Sample, Sample]]:
    """(chosen, rejected) pairs with 30-word prompts and answers of 100-250 words, as RLAIF-V detailed descriptions."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = random_image(rng)
        q = words(rng, prompt_words) + "?"
        c, r = (words(rng, int(rng.integers(*answer_words))) for _ in range(2))
        out.append((Sample(img, q, c), Sample(img, q, r)))
    return out


def write_pair_dataset(
    directory: str | Path,
    n_pairs: int,
    *,
    per_prompt: int = 2,
    samples: int = 10,
    seed: int = 0,
    answer_words: tuple[int, int] = (100, 250),
) -> Path:
    """A pair file (``pairs.jsonl`` + PNG images) shaped like the pipeline's output, for timing the reference stage
    as it runs (images read from disk). Each prompt has ``samples`` answers of 100-250 words with hallucination
    counts drawn from Poisson(1.5); pairs are drawn from its answers whose scores differ as ``muffin.feedback.pairs``
    draws them, at most ``per_prompt`` per prompt (the original's ``pair_diff1_samp2``: 2), a prompt's pairs
    adjacent. ``per_prompt=1`` with ``samples=2`` gives independent pairs (a prompt, an image each)."""
    from muffin.feedback.pairs import candidate_pairs, sample_pairs

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows: list[dict] = []
    p = 0
    while len(rows) < n_pairs:
        answers = [words(rng, int(rng.integers(*answer_words))) for _ in range(samples)]
        scores = [-int(x) for x in rng.poisson(1.5, samples)] if samples > 2 else [0, -1]
        picked = sample_pairs(candidate_pairs(scores), per_prompt, seed=int(rng.integers(1 << 30)))
        if not picked:
            continue
        random_image(rng).save(directory / f"img{p}.png")
        q = words(rng, 30) + "?"
        for c, r in picked[: n_pairs - len(rows)]:
            rows.append(
                {
                    "idx": len(rows),
                    "image_path": f"img{p}.png",
                    "question": q,
                    "chosen": answers[c],
                    "rejected": answers[r],
                }
            )
        p += 1
    with open(directory / "pairs.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return directory / "pairs.jsonl"


@dataclass
class Timing:
    median_s: float
    runs: list[float]


def timeit(fn: Callable[[], object], warmup: int = 1, repeat: int = 3) -> Timing:
    """Median wall time of ``fn`` after warm-up, with CUDA synchronised around each run."""
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        runs.append(time.perf_counter() - t)
    return Timing(statistics.median(runs), runs)


def matmul_peak_tflops(n: int = 8192, dtype: torch.dtype = torch.bfloat16, seconds: float = 2.0) -> float:
    """Measured dense bf16 matmul throughput (TFLOP/s), the denominator of MFU: the best of five windows of about
    ``seconds / 5`` each, after at least ``seconds / 2`` of the same products, i.e. the rate the GPU holds over the
    length of a timed step (the GEMMs of a training step run under that load, not after idle). One output buffer:
    three n x n matrices of memory."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    c = torch.empty_like(a)
    t = timeit(lambda: torch.mm(a, b, out=c), warmup=3, repeat=3).median_s
    per_window = max(1, round(seconds / 5 / t))

    def window() -> None:
        for _ in range(per_window):
            torch.mm(a, b, out=c)

    timeit(window, warmup=0, repeat=math.ceil(seconds / 2 / (t * per_window)))
    best = min(timeit(window, warmup=0, repeat=5).runs)
    return 2 * n**3 * per_window / best / 1e12


def matmul_burst_tflops(n: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float:
    """The matmul rate of a short burst (ten products, median of three, after two): this project's MFU denominator
    through run 9, printed beside it. On an idle GPU it read up to ~10% above the sustained rate and spread ~8%
    between consecutive calls (run 10, machine A: 730, 676, 676, 693, 684 TFLOP/s, against 666-675 over 3 s of
    products)."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    t = timeit(lambda: [a @ b for _ in range(10)], warmup=2, repeat=3)
    return 2 * n**3 * 10 / t.median_s / 1e12


GPU_EVENTS = ("kernel", "gpu_memcpy", "gpu_memset")  # chrome-trace categories of work on the GPU


def trace_events(prof) -> list[dict]:
    """The events of a finished ``torch.profiler.profile`` as its chrome trace lists them."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        with open(f.name) as trace_file:
            return json.load(trace_file)["traceEvents"]


def gpu_idle_gaps(trace: list[dict]) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """The GPU's (start, end) intervals of work in time order, and its idle stretches between the first and the
    last as (length, start) pairs, in microseconds."""
    work = sorted((e["ts"], e["ts"] + e["dur"]) for e in trace if e.get("cat") in GPU_EVENTS)
    gaps, end = [], work[0][1]
    for a, b in work[1:]:
        if a > end:
            gaps.append((a - end, end))
        end = max(end, b)
    return work, gaps


def memory_bandwidth_gbs(nbytes: int = 2 << 30) -> float:
    """Measured device-to-device copy bandwidth (GB/s, bytes read + written)."""
    x = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    t = timeit(lambda: [y.copy_(x) for _ in range(10)], warmup=2, repeat=3)
    return 2 * nbytes * 10 / t.median_s / 1e9


def print_table(title: str, header: list[str], rows: list[list[object]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    print(f"\n{title}")
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(str(x).ljust(w) for x, w in zip(r, widths)))
