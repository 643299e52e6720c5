"""Decoding settings, with the paper's presets, and per-sample seeded sampling.

Seeded sampling uses the Gumbel-max trick inside a logits processor: each row of a batch draws its noise from its
own ``torch.Generator``, so a sample's answer depends on its seed only, not on which batch it landed in.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from transformers import LogitsProcessor


@dataclass(frozen=True)
class Decoding:
    """How to decode; ``to_generate_kwargs()`` turns it into ``model.generate`` arguments."""

    max_new_tokens: int = 512
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"sampling needs temperature > 0, got {self.temperature}; use do_sample=False for greedy")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def replace(self, **kw: Any) -> Decoding:
        return replace(self, **kw)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_generate_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "num_beams": self.num_beams,
            "do_sample": self.do_sample,
        }
        if self.repetition_penalty != 1.0:
            kw["repetition_penalty"] = self.repetition_penalty
        if self.do_sample:
            kw.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return kw


# Paper settings. LLaVA 1.5 chat / benchmarks: 3 beams, greedy (no sampling), up to 1024 new tokens.
BEAM3_GREEDY = Decoding(max_new_tokens=1024, num_beams=3)
# OmniLMM 12B chat: beam sampling, 3 beams, T 0.6, top_k 30, top_p 0.9, repetition penalty 1.1.
OMNILMM_CHAT = Decoding(
    max_new_tokens=1024, num_beams=3, do_sample=True, temperature=0.6, top_k=30, top_p=0.9, repetition_penalty=1.1
)
# Candidate sampling for feedback data: T 0.7, up to 512 new tokens (10 samples per prompt).
CANDIDATE_SAMPLING = Decoding(max_new_tokens=512, do_sample=True, temperature=0.7)
GREEDY = Decoding()


_MASK64 = (1 << 64) - 1


def _signed(x: int) -> int:
    """A uint64 constant as the int64 torch stores (two's complement)."""
    return x - (1 << 64) if x >= 1 << 63 else x


_MIX1, _MIX2 = _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def counter_uniform(seeds: torch.Tensor, step: int, n: int) -> torch.Tensor:
    """Uniform(0, 1) float64 noise (B, n) from splitmix64 of (seed, step, index): a pure function of its inputs, so
    identical on every device and for every batch composition. int64 products wrap around like uint64 ones."""
    idx = torch.arange(n, device=seeds.device, dtype=torch.int64)
    offset = _signed((step * 0x9E3779B97F4A7C15 + 0x9E3779B97F4A7C15) & _MASK64)  # wrap in Python, not in torch
    z = seeds[:, None] * _MIX1 + idx[None, :] * _MIX2 + offset
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    z = z ^ _shr(z, 31)
    return (_shr(z, 11).double() + 0.5) / float(1 << 53)  # 53 random bits, never exactly 0 or 1


class SeededSamplingProcessor(LogitsProcessor):
    """Samples each row from its own seed: argmax(log_softmax(filtered logits / T) + Gumbel noise).

    Used with greedy search (``do_sample=False, num_beams=1``): the argmax of log-probs plus independent Gumbel(0, 1)
    noise is an exact sample from the filtered softmax. The noise is a counter-based hash of (seed, step, token), so
    a sample's answer depends on its seed only: not on the batch it landed in, nor on the device.
    """

    def __init__(self, seeds: list[int], temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> None:
        self.seeds = torch.tensor([int(s) & (_MASK64 >> 1) for s in seeds], dtype=torch.int64)
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.step = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.float() / self.temperature  # (B, V)
        if self.top_k > 0:
            kth = torch.topk(scores, min(self.top_k, scores.size(-1)), dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
            probs = sorted_scores.softmax(-1)
            drop_sorted = (probs.cumsum(-1) - probs) >= self.top_p  # keep the smallest set with mass >= p
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            scores = scores.masked_fill(drop, float("-inf"))
        u = counter_uniform(self.seeds.to(scores.device), self.step, scores.size(-1))
        self.step += 1
        gumbel = (-torch.log(-torch.log(u))).float()
        return scores.log_softmax(-1) + gumbel
