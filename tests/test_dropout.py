"""Counter-based LoRA dropout (muffin.fast.dropout): the mask's statistics, determinism, gradient, and the module swap."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from muffin.fast.dropout import (
    SeededDropout,
    keep_mask,
    seed_dropout,
    seeded_dropout,
    seeded_modules,
    use_seeded_dropout,
)

SHAPE = (512, 4096)  # 2M elements


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_drop_rate_and_independence(p) -> None:
    """Each element is dropped with probability p, and independently: of its row and column neighbours, of the
    same element under another salt (another module) and under another seed (another call). Bounds: 6 standard
    deviations of the binomial count (for neighbour pairs, which overlap, with their covariance)."""
    seed = torch.tensor(20261201)
    drop = ~keep_mask(SHAPE, p, seed, salt=3)
    n = drop.numel()

    def close(rate, q, count, extra=0.0):
        assert abs(rate - q) < 6 * math.sqrt((q * (1 - q) + extra) / count), (rate, q)

    close(drop.float().mean().item(), p, n)
    overlap = 2 * p**3 * (1 - p)  # neighbour pairs i and i + 1 share an element
    close((drop[:, 1:] & drop[:, :-1]).float().mean().item(), p * p, n, overlap)
    close((drop[1:] & drop[:-1]).float().mean().item(), p * p, n, overlap)
    other_salt = ~keep_mask(SHAPE, p, seed, salt=4)
    other_seed = ~keep_mask(SHAPE, p, seed + 1, salt=3)
    close((drop & other_salt).float().mean().item(), p * p, n)
    close((drop & other_seed).float().mean().item(), p * p, n)
    # and the rate holds over the seeds too: 2000 seeds, one 1024-element mask each
    rates = torch.stack([(~keep_mask((1024,), p, torch.tensor(s), salt=1)).float().mean() for s in range(2000)])
    close(rates.mean().item(), p, 2000 * 1024)
    assert rates.std().item() == pytest.approx(math.sqrt(p * (1 - p) / 1024), rel=0.1)


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_masks_under_two_keys_are_not_permutations_of_each_other(p) -> None:
    """Without the second key between the rounds, the mask under key k1 at element i would equal the mask under
    k2 at element i ^ k1 ^ k2 (the first round sees the same input x = i ^ k1). With it, those aligned pairs (the
    same x, each key's second key) agree no more often than independent draws (6 standard deviations), for
    another salt and for another seed."""
    from muffin.fast.dropout import _keyed_hash, _keys, _threshold

    def drop(x, seed, salt):
        return (_keyed_hash(x, _keys(torch.tensor(seed), salt)[1]) ^ -(2**31)) < _threshold(p) - 2**31

    n = 1 << 22
    x = torch.arange(n, dtype=torch.int32) ^ _keys(torch.tensor(20261201), 3)[0]
    a = drop(x, 20261201, 3)
    for seed, salt in ((20261201, 4), (20261202, 3)):
        both = (a & drop(x, seed, salt)).float().mean().item()
        assert abs(both - p * p) < 6 * math.sqrt(p * p * (1 - p * p) / n), (both, p * p)


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_no_correlation_at_power_of_two_distances(p) -> None:
    """Elements 1, 2, 4, ..., 2**20 apart are dropped together as often as independent draws would be, under eight
    keys (6 standard deviations each, with the covariance of overlapping pairs; 336 checks in all, so a false alarm
    has odds ~1e-6). The two-round lowbias32 fails this at 2**10-2**14 under many keys (up to 34 standard
    deviations)."""
    n = 1 << 22
    for seed, salt in [(1, 0), (6, 3), (15, 3), (20, 3), (123456, 77), (2**30 + 3, 11), (999, 5), (2**31 - 1, 2)]:
        drop = ~keep_mask((n,), p, torch.tensor(seed), salt)
        for k in range(21):
            d = 1 << k
            both = (drop[d:] & drop[:-d]).float().mean().item()
            sd = math.sqrt((p * p * (1 - p * p) + 2 * p**3 * (1 - p)) / (n - d))  # pair i shares an element with i + d
            assert abs(both - p * p) < 6 * sd, (seed, salt, d, (both - p * p) / sd)


def test_seeds_a_power_of_two_apart_give_independent_masks() -> None:
    """Seeds s and s + 2**j (j = 17..30) against each other, aligned and with the index shifted by 2**(j - 17) either
    way (where a second key linear in the key let the hashes cancel: up to 300 standard deviations at j = 29, 30)."""
    n, p = 1 << 22, 0.5
    sd = math.sqrt(p * p * (1 - p * p) / n)  # pairs from two masks share no element
    for seed, salt in [(123, 7), (987654321, 2**32 - 5)]:
        a = ~keep_mask((n,), p, torch.tensor(seed), salt)
        for j in range(17, 31):
            b = ~keep_mask((n,), p, torch.tensor((seed + 2**j) % 2**31), salt)
            d = 1 << (j - 17)
            for x, y in [(a, b), (a[d:], b[:-d]), (a[:-d], b[d:])]:
                z = ((x & y).float().mean().item() - p * p) / sd
                assert abs(z) < 6, (seed, j, z)


def test_mask_is_a_function_of_seed_salt_and_place() -> None:
    seed = torch.tensor(7)
    a = keep_mask((64, 33), 0.3, seed, salt=1)
    assert torch.equal(a, keep_mask((64, 33), 0.3, torch.tensor(7), salt=1))
    assert torch.equal(a.flatten(), keep_mask((64 * 33,), 0.3, seed, salt=1))  # the flat index is the counter
    assert not torch.equal(a, keep_mask((64, 33), 0.3, seed, salt=2))
    assert not torch.equal(a, keep_mask((64, 33), 0.3, torch.tensor(8), salt=1))
    assert keep_mask((64, 33), 0.0, seed, salt=1).all()
    assert keep_mask((64, 33), -0.1, seed, salt=1).all()
    assert not keep_mask((64, 33), 1.0, seed, salt=1).any()  # the threshold would wrap to "keep all" in int32


def _reference_keep(n: int, p: float, seed: int, salt: int) -> torch.Tensor:
    """The same hash in unsigned arithmetic held in int64: no wrap-around, no sign, every product below 2**49 (the
    multiplier split in 16-bit halves): the specification the int32 kernels must match bit for bit."""
    m = 0xFFFFFFFF

    def mul(x, c):  # x * c modulo 2**32
        return (x * (c & 0xFFFF) + ((x * (c >> 16) & 0xFFFF) << 16)) & m

    def triple32(x, key2=0):
        x = mul((x >> 17) ^ x, 0xED5AD4BB) ^ key2
        x = mul((x >> 11) ^ x, 0xAC4C1B51)
        x = mul((x >> 15) ^ x, 0x31848BAB)
        return (x >> 14) ^ x

    key = mul(torch.tensor(seed & 0x7FFFFFFF), 0x9E3779B1) ^ triple32(torch.tensor(salt & m))
    u = triple32(torch.arange(n) & m ^ key, mul((key >> 16) ^ key, 0xAC4C1B51) + 1 & m)
    return u >= round(p * 2**32)


@pytest.mark.parametrize("p", [0.05, 0.5, 0.999])
def test_int32_hash_equals_the_unsigned_reference(p) -> None:
    """Wrapping int32 products, masked shifts and the sign-flipped comparison give the unsigned hash's bits, for
    seeds and salts over the whole 31- and 32-bit ranges (and beyond: their low 31 / 32 bits count)."""
    cases = [(0, 0), (12345, 3), (2**31 - 2, 0xFFFFFFFF), (987654321, 0x80000000), (2**31 + 5, -1), (-7, 2**40 + 9)]
    for seed, salt in cases:
        want = _reference_keep(100_003, p, seed, salt)
        assert torch.equal(keep_mask((100_003,), p, torch.tensor(seed), salt), want)


def test_wrap32_keeps_the_low_32_bits() -> None:
    from muffin.fast.dropout import _wrap32

    x = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 5, 2**40 + 2**31 + 7])
    got = _wrap32(x)
    assert got.dtype == torch.int32
    assert torch.equal(got.to(torch.int64) & 0xFFFFFFFF, x & 0xFFFFFFFF)
    assert got.tolist()[:6] == [0, 1, 2**31 - 1, -(2**31), -1, 0]


def test_seeded_dropout_scales_and_backpropagates_through_the_mask() -> None:
    x = torch.randn(40, 96, dtype=torch.float64, requires_grad=True)
    seed = torch.tensor(11)
    keep = keep_mask(x.shape, 0.2, seed, salt=5)
    y = seeded_dropout(x, 0.2, seed, 5)
    torch.testing.assert_close(y, x * keep / 0.8)
    g = torch.randn_like(x)
    y.backward(g)
    torch.testing.assert_close(x.grad, g * keep / 0.8)
    assert seeded_dropout(x, 0.0, seed, 5) is x
    assert (seeded_dropout(x, 1.0, seed, 5) == 0).all()  # everything dropped, no division by zero


@pytest.mark.parametrize("backend", ["eager", "aot_eager_decomp_partition", "inductor"])
def test_compiled_mask_equals_eager(backend) -> None:
    """Traced (dynamic shapes, through AOT autograd's decompositions, and inductor's generated C++ on the CPU) the
    hash computes the same bits, and a new seed tensor of the same shape reuses the graph."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    f = torch.compile(lambda x, s: seeded_dropout(x, 0.05, s, 9), backend=backend, dynamic=True)
    for rows, s in [(37, 1), (50, 2), (50, 3)]:
        x = torch.randn(rows, 64)
        assert torch.equal(f(x, torch.tensor(s)), seeded_dropout(x, 0.05, torch.tensor(s), 9))
    assert counters["stats"]["unique_graphs"] == 1


def test_seeded_dropout_module() -> None:
    """Eval: identity. Training without a seed: torch's dropout (same generator draw as F.dropout). With a seed:
    the hash mask, the same for the same seed."""
    d = SeededDropout(0.25, salt=6)
    x = torch.randn(30, 40)
    d.eval()
    assert d(x) is x
    d.train()
    torch.manual_seed(0)
    a = d(x)
    torch.manual_seed(0)
    torch.testing.assert_close(a, F.dropout(x, 0.25, True))
    d.seed = torch.tensor(4)
    torch.testing.assert_close(d(x), x * keep_mask(x.shape, 0.25, torch.tensor(4), 6) / 0.75)


def _lora_model(dropout: float):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["0", "2"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:  # peft starts B at zero: the adapters (and their dropout) would not change the output
            torch.nn.init.normal_(p)
    return model


def test_lora_dropouts_swapped_with_salts_by_role() -> None:
    """use_seeded_dropout swaps peft's nn.Dropout for SeededDropout of the same p; the salt hashes the module's
    name without its layer number: distinct within a layer, the same for the same role in every layer (so the
    layers trace to one graph) and for a model built twice, distinct for modules numbered otherwise (experts);
    peft's Identity (dropout 0) stays."""
    from peft import LoraConfig, get_peft_model

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(
                torch.nn.ModuleDict({"q": torch.nn.Linear(8, 8), "v": torch.nn.Linear(8, 8)}) for _ in range(12)
            )
            self.experts = torch.nn.ModuleList(torch.nn.ModuleDict({"q": torch.nn.Linear(8, 8)}) for _ in range(2))

    def build():
        return get_peft_model(Model(), LoraConfig(r=2, lora_dropout=0.1, target_modules=["q", "v"]))

    model = build()
    assert use_seeded_dropout(model) == 26
    salts = {n: m.salt for n, m in model.named_modules() if isinstance(m, SeededDropout)}
    assert all(
        isinstance(m, SeededDropout) and m.p == 0.1
        for n, m in model.named_modules()
        if n.endswith("lora_dropout.default")
    )
    by_layer = [[s for n, s in salts.items() if f".layers.{i}." in n] for i in range(12)]
    assert len(set(by_layer[0])) == 2 and all(layer == by_layer[0] for layer in by_layer)  # layers 1 and 11 too
    experts = [s for n, s in salts.items() if ".experts." in n]  # numbered otherwise than by layer: kept apart
    assert len(set(experts)) == 2 and not set(experts) & set(by_layer[0])
    assert use_seeded_dropout(model) == 0  # idempotent
    other = build()
    use_seeded_dropout(other)
    assert {n: m.salt for n, m in other.named_modules() if isinstance(m, SeededDropout)} == salts
    assert use_seeded_dropout(_lora_model(0.0)) == 0


def test_seed_dropout_gives_one_seed_per_call_repeatably() -> None:
    """seed_dropout: one seed for the block's modules, drawn from torch's generator (repeatable under
    torch.manual_seed), cleared afterwards; LoRA outputs then follow the seeded masks."""
    model = _lora_model(0.3)
    use_seeded_dropout(model)
    model.train()
    mods = seeded_modules(model)
    assert len(mods) == 2
    x = torch.randn(5, 16)
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        with seed_dropout(mods, x.device):
            seeds = {int(m.seed) for m in mods}
            outs.append(model(x))
        assert len(seeds) == 1 and all(m.seed is None for m in mods)
    with seed_dropout(mods, x.device):  # nested: the outer block's seed comes back after the inner one
        outer = mods[0].seed
        with seed_dropout(mods, x.device):
            assert all(m.seed is not outer for m in mods)
        assert all(m.seed is outer for m in mods)
    torch.testing.assert_close(outs[0], outs[1])
    with seed_dropout(mods, x.device):
        assert not torch.equal(model(x), outs[0])  # the next draw: another seed
    model.eval()
    assert seeded_modules(model) == []


def test_prepare_model_uses_seeded_dropout(tiny_llava) -> None:
    from muffin import load_family
    from muffin.train.trainer import prepare_model

    fam = load_family(tiny_llava, device="cpu", dtype=torch.float32)
    prepare_model(fam, SimpleNamespace(use_lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.05, freeze_vision=True))
    drops = [m for m in fam.model.modules() if isinstance(m, SeededDropout)]
    n_lora = sum(1 for m in fam.model.modules() if hasattr(m, "lora_A") and len(m.lora_A))
    assert len(drops) == n_lora > 0 and all(d.p == 0.05 for d in drops)
    assert not any(type(m) is torch.nn.Dropout for m in fam.model.modules() if hasattr(m, "lora_dropout"))


@pytest.mark.gpu
def test_cuda_and_inductor_masks_equal_the_cpu_mask() -> None:
    """The same bits on the CPU, eagerly on CUDA and in inductor's Triton kernel (bf16 input, dynamic shapes)."""
    seed = torch.tensor(99)
    x = torch.randn(300, 4096, dtype=torch.bfloat16)
    want = seeded_dropout(x, 0.05, seed, 11)
    f = torch.compile(lambda x, s: seeded_dropout(x, 0.05, s, 11), dynamic=True)
    for got in (seeded_dropout(x.cuda(), 0.05, seed.cuda(), 11), f(x.cuda(), seed.cuda())):
        assert torch.equal(got.cpu(), want)
