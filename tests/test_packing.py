"""The shared-prefix fast path computes what the plain path computes: log-probs, gradients, yes/no logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from muffin import Sample, load_family
from muffin.fast.attention import use_flat_row
from muffin.fast.layout import pack_groups
from muffin.fast.logps import target_logps
from muffin.fast.packing import packed_answer_logps, packed_next_token_logits, plain_answer_logps, supports_packing


@pytest.fixture(scope="module")
def fam(tiny_llava):
    return load_family(tiny_llava, device="cpu")


def test_pack_groups_layout() -> None:
    """Rows [1 2 3 4 5] and [1 2 3 6] with cap 3: prefix [1 2 3], branches [4 5] and [6]; positions continue."""
    p = pack_groups([[[1, 2, 3, 4, 5], [1, 2, 3, 6]]], caps=[10], pad_id=0)
    assert p.input_ids.tolist() == [[1, 2, 3, 4, 5, 6]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4, 3]]
    assert p.segment.tolist() == [[0, 0, 0, 1, 1, 2]]
    assert p.index[0] == [[0, 1, 2, 3, 4], [0, 1, 2, 5]]
    m = p.mask()[0, 0].int().tolist()
    assert m[5] == [1, 1, 1, 0, 0, 1]  # branch 2 sees the prefix and itself, not branch 1
    assert m[4] == [1, 1, 1, 1, 1, 0]
    capped = pack_groups([[[1, 2, 3, 4], [1, 2, 3, 4, 5]]], caps=[2], pad_id=0)
    assert capped.prefix_len == [2]


def test_packed_logps_and_grads_equal_plain_path(tiny_llava, pairs, grad_pass) -> None:
    """float32 on CPU: sums, means, per-token values and every parameter gradient agree to 1e-5."""
    assert supports_packing(load_family(tiny_llava, device="cpu"))
    # a small chunk exercises the chunked backward
    results = [grad_pass(load_family(tiny_llava, device="cpu"), pairs, packed, chunk=7) for packed in (False, True)]
    (plain, g_plain), (fast, g_fast) = results
    torch.testing.assert_close(fast.sums, plain.sums, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.means, plain.means, atol=1e-5, rtol=1e-5)
    for a, b in zip(fast.per_token, plain.per_token):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert g_fast.keys() == g_plain.keys() and len(g_fast) > 10
    for n in g_plain:
        torch.testing.assert_close(g_fast[n], g_plain[n], atol=1e-5, rtol=1e-4, msg=n)


def test_packed_yes_no_logits_equal_plain(fam, pairs) -> None:
    img = pairs[0][0].image
    groups = [
        [
            Sample(img, "Is there a red circle in the image?"),
            Sample(img, "Is there a dog?"),
            Sample(img, "Are there two blue squares on the left of the table?"),
        ],
        [Sample(pairs[1][0].image, "Is there a cup?")],
    ]
    got = packed_next_token_logits(fam, groups)
    flat = [s for g in groups for s in g]
    with torch.no_grad():
        want = torch.stack([fam.forward(fam.encode([s], for_generation=True))[0, -1] for s in flat])
    torch.testing.assert_close(got, want.float(), atol=1e-4, rtol=1e-4)


def test_chunked_target_logps_grad_matches_full_softmax() -> None:
    torch.manual_seed(0)
    h = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(6, 11, bias=False).double()
    labels = torch.randint(0, 11, (9,))
    got = target_logps(h, head, labels, chunk=4)
    want = torch.log_softmax(h @ head.weight.T, -1).gather(-1, labels[:, None]).squeeze(-1)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-6)
    w = torch.randn(9, dtype=torch.float64)
    gh, gw = torch.autograd.grad((got.double() * w).sum(), (h, head.weight))
    eh, ew = torch.autograd.grad((want * w).sum(), (h, head.weight))
    torch.testing.assert_close(gh, eh, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw, ew, atol=1e-5, rtol=1e-5)


def test_inference_helpers_packed_equal_plain(fam, pairs) -> None:
    """answer_logps and yes_no_probs give the same numbers with and without packing (public entry points)."""
    from muffin.inference import answer_logps, yes_no_probs

    flat = [s for p in pairs for s in p]
    a = answer_logps(fam, flat, batch_size=4, packed=True)
    b = answer_logps(fam, flat, batch_size=4, packed=False)
    assert [x.sum for x in a] == pytest.approx([x.sum for x in b], abs=1e-4)
    img = pairs[0][0].image
    qs = [Sample(img, f"Is there a {w} in the image?") for w in ("dog", "red circle", "cup")]
    qs.append(Sample(pairs[1][0].image, "Is there a cup?"))
    ya = yes_no_probs(fam, qs, batch_size=2, packed=True)
    yb = yes_no_probs(fam, qs, batch_size=2, packed=False)
    assert np.allclose(ya, yb, atol=1e-5)


@pytest.mark.gpu
def test_packed_equals_plain_on_gpu_bf16(tiny_llava, pairs) -> None:
    """bf16 on CUDA: packed and plain sums agree within bf16 noise (0.5% of |sum|, at least 0.05)."""
    fam = load_family(tiny_llava, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        fast = packed_answer_logps(fam, pairs)
        plain = plain_answer_logps(fam, [s for p in pairs for s in p])
    tol = torch.clamp(plain.sums.abs() * 0.005, min=0.05)
    assert ((fast.sums - plain.sums).abs() <= tol).all(), (fast.sums, plain.sums)


def test_omnilmm_packed_equals_plain(tmp_path_factory, pairs, grad_pass) -> None:
    """The OmniLMM family's fast-path hooks: packed log-probs, gradients and yes/no logits equal the plain path."""
    from utils.tiny_models import build_tiny

    path = build_tiny("omnilmm", tmp_path_factory.mktemp("tiny-omnilmm"))
    results = []
    for packed in (False, True):
        fam = load_family(path, device="cpu")
        assert supports_packing(fam)
        results.append(grad_pass(fam, pairs, packed))
    (plain, g_plain), (fast, g_fast) = results
    torch.testing.assert_close(fast.sums, plain.sums, atol=1e-5, rtol=1e-5)
    assert g_fast.keys() == g_plain.keys() and any(n.startswith("model.resampler.") for n in g_fast)
    for n in g_plain:  # float32 sums in another order: error relative to the gradient's scale (a bias sums ~1e2-sized
        # terms over every image position; the image is encoded twice on the plain path, once packed)
        atol = max(1e-5, 1e-6 * g_plain[n].abs().max().item())
        torch.testing.assert_close(g_fast[n], g_plain[n], atol=atol, rtol=1e-4, msg=n)
    fam.model.eval()
    img = pairs[0][0].image
    groups = [[Sample(img, "Is there a red circle in the image?"), Sample(img, "Is there a dog?")]]
    got = packed_next_token_logits(fam, groups)
    with torch.no_grad():
        want = torch.stack([fam.forward(fam.encode([s], for_generation=True))[0, -1] for s in groups[0]])
    torch.testing.assert_close(got, want.float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["llava", "omnilmm"])
def test_flat_flex_layout_equals_plain(kind, tiny_llava, tmp_path_factory, pairs) -> None:
    """The GPU layout (all groups in one row, FlexAttention BlockMask) forced on the CPU, float32, forward only
    (FlexAttention has no CPU backward): log-probs and yes/no logits equal the plain path to 1e-5."""
    from utils.tiny_models import build_tiny

    path = tiny_llava if kind == "llava" else build_tiny("omnilmm", tmp_path_factory.mktemp("tiny-omni-flex"))
    fam = load_family(path, device="cpu")
    fam.fast.packed_attention = "flex"
    assert use_flat_row(fam, torch.device("cpu"))
    with torch.no_grad():
        fast = packed_answer_logps(fam, pairs, chunk=7)
        plain = plain_answer_logps(fam, [s for p in pairs for s in p])
    torch.testing.assert_close(fast.sums, plain.sums, atol=1e-5, rtol=1e-5)
    for a, b in zip(fast.per_token, plain.per_token):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    img = pairs[0][0].image
    groups = [[Sample(img, "Is there a red circle in the image?"), Sample(img, "Is there a dog?")], [pairs[1][0]]]
    with torch.no_grad():
        got = packed_next_token_logits(fam, groups)
        want = torch.stack([fam.forward(fam.encode([s], for_generation=True))[0, -1] for g in groups for s in g])
    torch.testing.assert_close(got, want.float(), atol=1e-4, rtol=1e-4)
    fam.fast.packed_attention = "dense"
    assert not use_flat_row(fam, torch.device("cuda"))
    fam.fast.packed_attention = "auto"
    assert use_flat_row(fam, torch.device("cuda")) and not use_flat_row(fam, torch.device("cpu"))


def testflat_layout_block_mask_matches_dense_mask() -> None:
    """The flat row's BlockMask allows exactly the dense per-group mask's pairs (mapped through ``where``)."""
    from muffin.fast.attention import flat_layout

    p = pack_groups([[[1, 2, 3, 4, 5], [1, 2, 3, 6]], [[7, 8, 9], [7, 8]]], caps=[10, 10], pad_id=0)
    ids, pos, bm, where = flat_layout(p, torch.device("cpu"), pad_id=0)
    # group 2 keeps one prefix token (every branch keeps at least one): [7] then [8 9] and [8]
    assert ids.shape[1] % 128 == 0 and ids[0, :11].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 8, 0]
    assert pos[0, :10].tolist() == [0, 1, 2, 3, 4, 3, 0, 1, 2, 1]
    dense = bm.to_dense()  # (1, 1, nq_blocks, nk_blocks): one block here
    assert dense.shape[-1] == 1
    T = ids.shape[1]
    q, k = torch.meshgrid(torch.arange(T), torch.arange(T), indexing="ij")
    full = bm.mask_mod(0, 0, q, k)
    m = p.mask()[:, 0]
    for g in range(2):
        cols = (p.segment[g] >= 0).nonzero().flatten()
        for a in cols:
            for b in cols:
                assert bool(full[where[g, a], where[g, b]]) == bool(m[g, a, b])
    assert not full[6:10, :6].any() and not full[:6, 6:10].any()  # groups never see each other


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["llava", "omnilmm"])
def test_flex_training_equals_dense_on_gpu(kind, tiny_llava, tmp_path_factory, pairs, grad_pass) -> None:
    """CUDA, float32: the default GPU layout (one flat row, compiled FlexAttention, decoder layers compiled with
    inductor where the family lists them, here also under gradient checkpointing) gives the log-probs and every
    parameter gradient of the dense per-group layout, of the same layout with eager layers and of the plain path."""
    from utils.tiny_models import build_tiny

    path = tiny_llava if kind == "llava" else build_tiny("omnilmm", tmp_path_factory.mktemp("tiny-omni-gpu"))
    results = {}
    for mode in ("plain", "dense", "auto-eager", "auto"):
        fam = load_family(path, device="cuda", dtype=torch.float32)
        fam.fast.packed_attention = "dense" if mode == "dense" else "auto"
        fam.fast.compile_layers = mode == "auto"
        assert use_flat_row(fam, torch.device("cuda")) == (mode != "dense")  # "plain" does not pack at all
        if mode == "auto" and kind == "llava":
            fam.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        out, grads = grad_pass(fam, pairs, packed=mode != "plain")
        results[mode] = (out.sums.detach(), grads)
    if kind == "llava":
        assert all(layer._packed_compiled for layer in fam.decoder_layers())
    for mode in ("dense", "auto-eager", "auto"):
        torch.testing.assert_close(results[mode][0], results["plain"][0], atol=1e-4, rtol=1e-4)
        for n, g in results["plain"][1].items():
            torch.testing.assert_close(results[mode][1][n], g, atol=1e-4, rtol=1e-3, msg=f"{mode} {n}")


def test_labeler_batch_default_follows_packing(fam) -> None:
    """The conquer stage's default batch: a whole prompt's questions in one packed pass, fewer on the plain path."""
    from muffin.feedback.autocheck import PACKED_BATCH, PLAIN_BATCH, effective_batch_size

    assert effective_batch_size(fam, 0) == PACKED_BATCH == 256
    assert effective_batch_size(fam, 7) == 7
    fam.fast.packing = False
    try:
        assert effective_batch_size(fam, 0) == PLAIN_BATCH == 16
    finally:
        fam.fast.packing = True


def test_packing_needs_the_hooks_and_the_option(fam) -> None:
    """``supports_packing``: the family's ``fast.packing`` decides for a family with the SharedPrefixModel hooks;
    an object without them (a model behind a server, a family without the hooks) runs plain whatever it declares."""
    from types import SimpleNamespace

    from muffin.family import FastPath

    assert supports_packing(fam) and fam.fast.packing
    fam.fast.packing = False
    try:
        assert not supports_packing(fam)
    finally:
        fam.fast.packing = True
    assert not supports_packing(SimpleNamespace(fast=FastPath(packing=True), model=fam.model))  # no hooks
    assert not supports_packing(object())  # not a family at all


def _shared_prefix_group(prefix_len: int, branch_lens: list[int], tok: int = 0) -> list[list[int]]:
    """Rows sharing exactly ``prefix_len`` tokens, then branches of the given lengths (distinct first tokens)."""
    prefix = [1 + (tok + i) % 50 for i in range(prefix_len)]
    return [prefix + [1000 + j] + [100 + (tok + j + i) % 50 for i in range(n - 1)] for j, n in enumerate(branch_lens)]


def _random_layout(seed: int) -> list[list[list[int]]]:
    rng = np.random.default_rng(seed)
    groups = []
    for g in range(int(rng.integers(3, 7))):
        prefix = int(rng.choice([0, 1, 37, 128, 200, 300]))
        n_branches = int(rng.choice([1, 2, 2, 5, 40]))
        longest = 20 if n_branches == 40 else 300
        groups.append(_shared_prefix_group(prefix, rng.integers(1, longest, n_branches).tolist(), tok=g))
    return groups


FLAT_LAYOUTS = {
    # one group, one row: the prefix keeps all but the last token (every branch keeps one)
    "one_group_one_row": [_shared_prefix_group(299, [1])],
    "one_group_two_branches": [_shared_prefix_group(700, [90, 250])],
    # DPO-like pairs: prefixes and branches crossing block boundaries, lengths multiple of 128 or not
    "dpo_pairs": [
        _shared_prefix_group(600, [45, 230], tok=1),
        _shared_prefix_group(128, [128, 128], tok=2),
        _shared_prefix_group(131, [300, 7], tok=3),
        _shared_prefix_group(1, [1, 1], tok=4),
    ],
    # groups filling whole blocks: no tail padding at all
    "exact_blocks": [_shared_prefix_group(128, [64, 64], tok=1), _shared_prefix_group(100, [100, 56], tok=2)],
    # the labeler: 40 short yes/no questions about one image behind its prefix, and a second image
    "yes_no_40": [
        _shared_prefix_group(600, [5 + i % 9 for i in range(40)], tok=1),
        _shared_prefix_group(590, [6 + i % 4 for i in range(40)], tok=2),
    ],
    "random_0": _random_layout(0),
    "random_1": _random_layout(1),
    "random_2": _random_layout(2),
}


def _element_mask(bm) -> torch.Tensor:
    """(T, T) bool: what FlexAttention computes with ``bm``: full blocks allowed, partial blocks through mask_mod."""
    T = bm.seq_lengths[0]
    q, k = torch.meshgrid(torch.arange(T), torch.arange(T), indexing="ij")
    bs = bm.BLOCK_SIZE[0]
    full = torch.zeros(bm.kv_indices.shape[-2:], dtype=torch.bool)
    for qb in range(full.shape[0]):
        full[qb, bm.full_kv_indices[0, 0, qb, : bm.full_kv_num_blocks[0, 0, qb]].long()] = True
    full = full.repeat_interleave(bs, 0).repeat_interleave(bs, 1)
    any_block = bm.to_dense()[0, 0].bool().repeat_interleave(bs, 0).repeat_interleave(bs, 1)
    return full | (any_block & bm.mask_mod(0, 0, q, k))


def _assert_same_ordered(num_a, idx_a, num_b, idx_b) -> None:
    assert num_a.dtype == num_b.dtype == torch.int32 and idx_a.dtype == idx_b.dtype == torch.int32
    assert num_a.shape == num_b.shape and idx_a.shape == idx_b.shape
    assert torch.equal(num_a, num_b)
    for row in range(num_a.shape[-1]):
        n = int(num_a[0, 0, row])
        assert torch.equal(idx_a[0, 0, row, :n], idx_b[0, 0, row, :n]), row


@pytest.mark.parametrize("name", list(FLAT_LAYOUTS))
def test_flat_block_mask_equals_create_block_mask(name) -> None:
    """The BlockMask built from per-query key intervals (no (T, T) tensor) is the one ``create_block_mask`` builds
    from a dense evaluation of the same mask_mod: same partial and full blocks (kv and q sides), same dense block
    map, and the element mask it implies is exactly mask_mod."""
    from torch.nn.attention.flex_attention import create_block_mask

    from muffin.fast.attention import FLEX_BLOCK, _allowed_intervals, flat_layout
    from muffin.fast.layout import flat_doc_seg

    groups = FLAT_LAYOUTS[name]
    p = pack_groups(groups, caps=[10**6] * len(groups), pad_id=0)
    n = int((p.segment >= 0).sum())
    ids, pos, bm, where = flat_layout(p, torch.device("cpu"), pad_id=0)
    T = ids.shape[1]
    assert T % FLEX_BLOCK == 0 and T - FLEX_BLOCK < n <= T
    if name == "exact_blocks":
        assert n == T  # no tail padding
    if name == "yes_no_40":
        assert p.segment.max() == 40 and p.prefix_len == [600, 590]
    ref = create_block_mask(bm.mask_mod, 1, None, T, T, device="cpu", BLOCK_SIZE=FLEX_BLOCK)
    assert bm.seq_lengths == ref.seq_lengths == (T, T) and bm.BLOCK_SIZE == ref.BLOCK_SIZE
    _assert_same_ordered(bm.kv_num_blocks, bm.kv_indices, ref.kv_num_blocks, ref.kv_indices)
    _assert_same_ordered(bm.full_kv_num_blocks, bm.full_kv_indices, ref.full_kv_num_blocks, ref.full_kv_indices)
    _assert_same_ordered(bm.q_num_blocks, bm.q_indices, ref.q_num_blocks, ref.q_indices)
    _assert_same_ordered(bm.full_q_num_blocks, bm.full_q_indices, ref.full_q_num_blocks, ref.full_q_indices)
    assert torch.equal(bm.to_dense(), ref.to_dense())
    q, k = torch.meshgrid(torch.arange(T), torch.arange(T), indexing="ij")
    dense = bm.mask_mod(0, 0, q, k)
    assert torch.equal(_element_mask(bm), dense) and torch.equal(_element_mask(ref), dense)
    # the intervals themselves are mask_mod, row by row
    doc, seg = flat_doc_seg(p, T)
    a1, b1, a2, b2 = (x[:, None] for x in _allowed_intervals(doc, seg))
    assert torch.equal(((k >= a1) & (k < b1)) | ((k >= a2) & (k < b2)), dense)


def test_compiled_layers_run_only_on_the_flat_path(tiny_llava, pairs, monkeypatch) -> None:
    """``compile_layers``: calls with a BlockMask (the flat packed row) go through torch.compile'd layers and give the
    eager numbers; generation and the plain path stay eager; ``False`` undoes it. The dynamo tracing is real, with
    the "eager" backend on the CPU (inductor, the GPU default, is checked by ``test_flex_training_equals_dense_on_gpu``)."""
    import torch._dynamo

    from muffin.decoding import GREEDY
    from muffin.fast import compiled_layers
    from muffin.inference import generate

    monkeypatch.setattr(compiled_layers, "COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    fam = load_family(tiny_llava, device="cpu", dtype=torch.float32)
    fam.fast.packed_attention = "flex"
    flat = [s for p in pairs for s in p]
    with torch.no_grad():
        fam.fast.compile_layers = False
        eager = packed_answer_logps(fam, pairs).sums
        assert not any(getattr(layer, "_packed_compiled", False) for layer in fam.decoder_layers())
        fam.fast.compile_layers = True
        frames = torch._dynamo.utils.counters["frames"]["ok"]
        compiled = packed_answer_logps(fam, pairs).sums
        assert all(layer._packed_compiled for layer in fam.decoder_layers())
        assert torch._dynamo.utils.counters["frames"]["ok"] > frames  # the layers were traced
        torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(compiled, plain_answer_logps(fam, flat).sums, atol=1e-4, rtol=1e-4)
        frames = torch._dynamo.utils.counters["frames"]["ok"]
        text = generate(fam, [Sample(pairs[0][0].image, pairs[0][0].question)], GREEDY.replace(max_new_tokens=4))
        assert torch._dynamo.utils.counters["frames"]["ok"] == frames  # generation ran the layers eagerly
        fam.fast.compile_layers = False
        packed_answer_logps(fam, pairs)
        assert not any(layer._packed_compiled for layer in fam.decoder_layers())
        assert (
            generate(fam, [Sample(pairs[0][0].image, pairs[0][0].question)], GREEDY.replace(max_new_tokens=4)) == text
        )
    with pytest.raises(ValueError, match="compile_layers must be"):
        fam.fast.compile_layers = "yes"
        packed_answer_logps(fam, pairs)


def test_compiled_layers_auto_means_cuda_and_a_wide_lm(fam) -> None:
    from muffin.fast import compiled_layers

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert compiled_layers._lm_hidden_size(fam) < compiled_layers.COMPILE_MIN_HIDDEN  # the tiny test model
    assert not compiled_layers.use_compiled_layers(fam, cuda) and not compiled_layers.use_compiled_layers(fam, cpu)
    fam.model.config.text_config.hidden_size, width = 4096, fam.model.config.text_config.hidden_size
    try:
        assert compiled_layers.use_compiled_layers(fam, cuda) and not compiled_layers.use_compiled_layers(fam, cpu)
        fam.fast.compile_layers = True
        assert compiled_layers.use_compiled_layers(fam, cpu)
        fam.fast.compile_layers = False
        assert not compiled_layers.use_compiled_layers(fam, cuda)
    finally:
        fam.model.config.text_config.hidden_size = width
        fam.fast.compile_layers = "auto"


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["varlen", "flex"])
def test_packed_training_step_never_waits_for_the_gpu(kernel, tiny_llava, pairs) -> None:
    """The packed DPO step (flat row, forward, loss, backward) queues all its work without one host-device
    synchronisation (torch's sync debug mode raises on any): inputs go over with asynchronous copies and the image
    places are read on the host. Warmed up once first (compilation and lazy CUDA setup may synchronise)."""
    from muffin.train.data import PairCollator
    from muffin.train.loss import preference_loss, sequence_logps
    from muffin.train.policy import concatenated_logps

    fam = load_family(tiny_llava, device="cuda", dtype=torch.bfloat16)
    fam.fast.packed_attention = kernel
    fam.model.train()
    batch = PairCollator(fam, max_length=512, packing=True)(
        [
            {"image": c.image, "question": c.question, "chosen": c.answer, "rejected": r.answer, "idx": i, "row": i}
            for i, (c, r) in enumerate(pairs)
        ]
    )

    def step() -> torch.Tensor:
        logps, mask = concatenated_logps(fam, batch)
        policy = sequence_logps(logps, mask)
        n = policy.shape[0] // 2
        out = preference_loss(policy[:n], policy[n:], policy[:n].detach() - 1, policy[n:].detach() + 1, beta=0.1)
        out.loss.backward()
        return out.loss.detach()

    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss)
