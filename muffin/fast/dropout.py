"""Counter-based LoRA dropout: the mask is a hash of (seed, salt, element index), not a draw from torch's generator,
so a compiled, gradient-checkpointed decoder layer recomputes it like any elementwise op (no random numbers to replay,
forward and recomputation agree by construction). Each element is dropped with probability ``p`` to within 2**-32,
independently of its neighbours, of other modules (salts) and of other calls (seeds): tests/test_dropout.py.
"""

from __future__ import annotations

import contextlib
import math
import re
import zlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B1 - 2**32  # spreads consecutive seeds over the 32-bit range (as a signed int32)
_INT32_MIN = -(2**31)
_T1, _T2, _T3 = 0xED5AD4BB - 2**32, 0xAC4C1B51 - 2**32, 0x31848BAB  # triple32's multipliers as signed int32
_LAYER_NUMBER = re.compile(r"((?:^|\.)(?:layers|layer|h|blocks|block)\.)\d+(?=\.|$)")


def _wrap32(x: torch.Tensor) -> torch.Tensor:
    """int64 -> int32 holding the same low 32 bits (two's complement), computed exactly in int64 first."""
    x = x & _MASK32
    return (x - ((x >> 31) << 32)).to(torch.int32)


def _keyed_hash(x: torch.Tensor, key2: torch.Tensor) -> torch.Tensor:
    """triple32 (three multiply-xorshift rounds, the constants and shifts of Wellons' hash-prospector) with a second
    key xored in after the first multiply, so masks under different keys do not share the later rounds' input. Three
    multiplies, not two: the two-round lowbias32 (tried, e796d37) drops elements 2**10-2**14 apart together up to
    34 standard deviations more or less often than chance under many keys (tests/test_dropout.py checks offsets
    2**0-2**20 under eight keys). int32 tensors read as 32 bits: products wrap modulo 2**32 and the masks after
    ``>>`` make the arithmetic shift a logical one, so CPU, CUDA and Triton kernels compute the unsigned hash's bits
    (checked against an int64 reference). int32, not int64: GPUs emulate 64-bit multiplies, and the hash is
    integer-throughput bound in the fused kernels (docs/PERFORMANCE.md, run 10)."""
    x = ((x >> 17) & 0x7FFF ^ x) * _T1 ^ key2
    x = ((x >> 11) & 0x1FFFFF ^ x) * _T2
    x = ((x >> 15) & 0x1FFFF ^ x) * _T3
    return (x >> 14) & 0x3FFFF ^ x


def _salt_key(salt: int) -> int:
    """The salt's 32-bit hash (triple32 in Python ints, so a traced graph holds a constant), as a signed int32."""
    x = int(salt) & _MASK32
    for shift, mul in ((17, _T1), (11, _T2), (15, _T3)):  # the signed multipliers give the same product mod 2**32
        x = ((x >> shift) ^ x) * mul & _MASK32
    x ^= x >> 14
    return x - 2**32 if x >= 2**31 else x


def _keys(seed: torch.Tensor, salt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The hash's two keys (int32, one element each): ``seed * golden ^ hash(salt)`` and a multiply-xorshift of it.
    The second is not linear in the first: with ``3 * key + 1``, seeds 2**27-2**30 apart gave masks whose hashes
    cancelled at an index shift (up to 300 standard deviations; test)."""
    key = (seed.reshape(()) & 0x7FFFFFFF).to(torch.int32) * _GOLDEN ^ _salt_key(salt)
    return key, ((key >> 16) & 0xFFFF ^ key) * _T2 + 1


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, seed: torch.Tensor, salt: int) -> torch.Tensor:
    """Bool mask of ``shape`` on ``seed``'s device, each element False with probability ``p``: a hash of the element's
    flat index (modulo 2**32) under the key ``seed * golden ^ hash(salt)`` (``seed``: an int64 tensor of one
    element, its low 31 bits used; ``salt``: a Python int). Inductor inlines the key into every element's work in a
    fused kernel: a handful of int32 ops, the salt being hashed in Python."""
    if p <= 0:
        return torch.ones(shape, dtype=torch.bool, device=seed.device)
    # p = 1 (to within 2**-33); also keeps the threshold inside int32 (torch wraps larger Python ints silently)
    if _threshold(p) >= 2**32:
        return torch.zeros(shape, dtype=torch.bool, device=seed.device)
    key, key2 = _keys(seed, salt)
    n = math.prod(shape)
    if n < 2**31:
        idx = torch.arange(n, device=seed.device, dtype=torch.int32)
    else:
        idx = _wrap32(torch.arange(n, device=seed.device))
    u = _keyed_hash(idx ^ key, key2)
    # unsigned u >= threshold, compared as signed numbers with the sign bit flipped on both sides
    return ((u ^ _INT32_MIN) >= _threshold(p) + _INT32_MIN).view(shape)


def _threshold(p: float) -> int:
    """Hashes below this are dropped: ``p`` in units of 2**-32 (an int, so a traced graph holds a constant)."""
    return int(round(p * 2**32))


def seeded_dropout(x: torch.Tensor, p: float, seed: torch.Tensor, salt: int) -> torch.Tensor:
    """``x`` with the elements ``keep_mask`` drops set to zero and the rest scaled by ``1 / (1 - p)``, like
    ``F.dropout``; differentiable in ``x`` (the gradient goes through the same mask)."""
    if p <= 0:
        return x
    if _threshold(p) >= 2**32:  # p = 1 (to within 2**-33): everything dropped
        return x * 0
    # the scale from the integer threshold: a constant in a traced graph, where dynamo keeps a float ``p`` symbolic
    # and the ops it derives from it would carry no checkpoint tag (the partitioner then saves the dropped input
    # instead of recomputing it, gigabytes on a 7B LoRA step)
    scale = 2**32 / (2**32 - _threshold(p))
    return x * keep_mask(x.shape, p, seed, salt).to(x.dtype) * scale


class SeededDropout(torch.nn.Dropout):
    """``nn.Dropout`` that takes its mask from ``keep_mask`` while ``self.seed`` is set (a fresh seed per call of
    the layer holding it: ``seed_dropout``), and from torch's generator otherwise. ``salt`` tells apart the
    modules that share a seed. ``prepare_model`` puts it in place of LoRA's dropout: with torch's own random
    numbers, the recomputation inside a compiled checkpointed layer would replay the generator, which torch's
    partitioner fails on ("Node ... was invalid, but is output") and which draws every mask twice."""

    def __init__(self, p: float = 0.5, salt: int = 0) -> None:
        super().__init__(p)
        self.seed: torch.Tensor | None = None
        self.salt = salt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.seed is None:
            return F.dropout(x, self.p, True, self.inplace)
        return seeded_dropout(x, self.p, self.seed, self.salt)


def use_seeded_dropout(model: torch.nn.Module) -> int:
    """Replace every LoRA ``nn.Dropout`` of ``model`` (peft's ``lora_dropout`` dicts) by a ``SeededDropout`` of the
    same ``p``; returns how many were replaced. Nothing changes until a seed is set.

    The salt tells apart the modules of one layer (which share the layer call's seed): a hash of the module's name
    with its layer number taken out (the number after ``layers.``, ``layer.``, ``h.``, ``blocks.`` or ``block.``), so
    ``layers.3.self_attn.q_proj`` and ``layers.7.self_attn.q_proj`` get the same salt (their calls' seeds differ)
    and every decoder layer traces to the same graph: one compilation, not one per layer. Other numbers stay (MoE
    ``experts.3``, ``Sequential`` indices): modules told apart only by them keep distinct salts. The same model gets
    the same masks from the same seeds."""
    n = 0
    for name, m in model.named_modules():
        drops = getattr(m, "lora_dropout", None)
        if not isinstance(drops, torch.nn.ModuleDict):
            continue
        for key, d in drops.items():
            if type(d) is torch.nn.Dropout:
                role = _LAYER_NUMBER.sub(r"\1#", f"{name}.{key}")
                drops[key] = SeededDropout(d.p, salt=zlib.crc32(role.encode()))
                n += 1
    return n


def seeded_modules(module: torch.nn.Module) -> list[SeededDropout]:
    """The active ``SeededDropout`` modules inside ``module`` (training, ``p > 0``)."""
    return [m for m in module.modules() if isinstance(m, SeededDropout) and m.training and m.p > 0]


@contextlib.contextmanager
def seed_dropout(modules: list[SeededDropout], device: torch.device) -> Iterator[None]:
    """Give ``modules`` one fresh seed for the duration of the block, drawn from torch's generator of ``device`` (so
    seeded runs repeat); the seeds they had before (none: torch's dropout) after the block."""
    if not modules:
        yield
        return
    seed = torch.randint(0, 2**31 - 1, (), device=device, dtype=torch.int64)
    before = [m.seed for m in modules]
    for m in modules:
        m.seed = seed
    try:
        yield
    finally:
        for m, old in zip(modules, before):
            m.seed = old
