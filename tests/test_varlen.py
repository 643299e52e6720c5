"""The FlashAttention varlen plan of the flat shared-prefix layout computes the packed block mask's attention."""

from __future__ import annotations

import pytest
import torch

from muffin import load_family
from muffin.family import FastPath
from muffin.fast.attention import FLEX_BLOCK, flat_kernel, flat_mask_mod, use_flat_row
from muffin.fast.layout import flat_doc_seg, pack_groups
from muffin.fast.packing import packed_answer_logps
from muffin.fast.varlen import segment_attention, segment_attention_ref, varlen_plan


def doc_seg_of(groups, pad_to: int):
    """``doc``, ``seg`` of the groups' flat row (``muffin.fast.layout.flat_doc_seg``), padded to a multiple of ``pad_to``."""
    packed = pack_groups(groups, [10**9] * len(groups), pad_id=0)
    n = int((packed.segment >= 0).sum())
    return flat_doc_seg(packed, -(-n // pad_to) * pad_to)


def dense_allowed(doc, seg):
    """The flat row's block mask (its FlexAttention ``mask_mod``) as a dense (T, T) tensor."""
    q, k = torch.arange(len(doc))[:, None], torch.arange(len(doc))[None]
    return flat_mask_mod(doc, seg)(0, 0, q, k)


def random_groups(gen: torch.Generator, n_groups: int):
    groups = []
    for _ in range(n_groups):
        prefix = torch.randint(1, 50, (int(torch.randint(0, 7, (1,), generator=gen)),), generator=gen).tolist()
        n_rows = int(torch.randint(1, 5, (1,), generator=gen))
        rows = []
        for j in range(n_rows):
            tail = torch.randint(1, 50, (int(torch.randint(1, 6, (1,), generator=gen)),), generator=gen).tolist()
            rows.append(prefix + [100 + j] + tail)  # distinct first token: the prefix ends where they part
        groups.append(rows)
    return groups


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("pad_to", [1, 16])
def test_plan_equals_block_mask_attention(seed, pad_to):
    gen = torch.Generator().manual_seed(seed)
    doc, seg = doc_seg_of(random_groups(gen, 5), pad_to)
    plan = varlen_plan(doc, seg)
    T, H, Hkv, D = len(doc), 4, 2, 8
    q = torch.randn(T, H, D, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(T, Hkv, D, generator=gen, dtype=torch.float64) for _ in range(2))
    mask = dense_allowed(doc, seg)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, enable_gqa=True
    ).transpose(0, 1)
    out = segment_attention(q, k, v, plan)  # CPU: segment_attention_ref
    keep = seg >= 0
    torch.testing.assert_close(out[keep], ref[keep], rtol=1e-10, atol=1e-10)
    # every key a query may see is gathered for it, and nothing else
    assert int(plan.cu_q[-1]) == T and int(plan.cu_k[-1]) == len(plan.k_index)


def test_plan_runs_of_a_pair():
    # one group: prefix of 3, chosen of 2, rejected of 2; then 1 pad
    doc = torch.tensor([0] * 7 + [-1])
    seg = torch.tensor([0, 0, 0, 1, 1, 2, 2, -1])
    plan = varlen_plan(doc, seg)
    assert plan.cu_q.tolist() == [0, 5, 7, 8]  # [prefix, chosen], [rejected], [pad]
    assert plan.cu_k.tolist() == [0, 5, 10, 11]
    assert plan.k_index.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 5, 6, 7]
    assert (plan.max_q, plan.max_k) == (5, 5)


def test_plan_refuses_a_scrambled_row():
    doc = torch.tensor([0, 0, -1, 0])
    seg = torch.tensor([0, 1, -1, 1])
    with pytest.raises(ValueError, match="not laid out"):
        varlen_plan(doc, seg)


def test_reference_path_has_gradients():
    doc, seg = doc_seg_of([[[1, 2, 3, 4], [1, 2, 5]]], FLEX_BLOCK)
    plan = varlen_plan(doc, seg)
    q, k, v = (torch.randn(len(doc), 2, 4, requires_grad=True) for _ in range(3))
    segment_attention_ref(q, k, v, plan).sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize(
    "doc, seg",
    [
        ([0, 0, 1, 0], [0, 1, 0, 1]),  # a group split in two
        ([0, 0, 0, 0], [0, 1, 2, 1]),  # a branch split in two
        ([0, 0, 0, 0], [0, 1, 0, 1]),  # prefix after a branch
    ],
)
def test_plan_refuses_other_layouts(doc, seg):
    with pytest.raises(ValueError, match="not laid out"):
        varlen_plan(torch.tensor(doc), torch.tensor(seg))


@pytest.fixture(scope="module")
def pairs(make_pairs):
    return make_pairs(seed=5, size=(30, 34))


@pytest.mark.parametrize("kind", ["llava", "omnilmm"])
def test_flat_varlen_training_equals_plain(kind, tiny_llava, tmp_path_factory, pairs, grad_pass, monkeypatch) -> None:
    """The varlen flat row (forced on the CPU: ``segment_attention_ref`` in place of the FlashAttention kernel), float32,
    decoder layers traced by dynamo ("eager" backend) under gradient checkpointing: log-probs and every parameter
    gradient equal the plain path's."""
    import torch._dynamo

    from muffin.fast import attention, compiled_layers
    from utils.tiny_models import build_tiny

    traced = []  # the compiled layers' graphs, run as traced ("eager" backend)
    monkeypatch.setattr(compiled_layers, "COMPILE_BACKEND", lambda gm, example_inputs: traced.append(gm) or gm.forward)
    torch._dynamo.reset()
    path = tiny_llava if kind == "llava" else build_tiny("omnilmm", tmp_path_factory.mktemp("tiny-omni-varlen"))
    fam = load_family(path, device="cpu", dtype=torch.float32)
    want_out, want_grads = grad_pass(fam, pairs, packed=False)
    fam.fast.packed_attention = "varlen"
    assert use_flat_row(fam, torch.device("cpu"))
    seen = []
    if kind == "llava":
        fam.fast.compile_layers = True
        fam.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:  # eager layers: count the varlen calls (a counter inside a compiled, checkpointed layer would be a side
        # effect that dynamo cannot keep inside the checkpoint)
        real = attention._varlen_forward
        monkeypatch.setattr(attention, "_varlen_forward", lambda *a, **k: seen.append(1) or real(*a, **k))
    got_out, got_grads = grad_pass(fam, pairs, packed=True)
    if kind == "llava":
        assert all(layer._packed_compiled for layer in fam.decoder_layers())
        sources = [
            node.meta.get("stack_trace") or ""
            for gm in traced
            for sub in gm.modules()
            if isinstance(sub, torch.fx.GraphModule)
            for node in sub.graph.nodes
        ]
        seen = [s for s in sources if "_varlen_forward" in s]
    assert seen  # the varlen attention really ran
    torch.testing.assert_close(got_out.sums.detach(), want_out.sums.detach(), atol=1e-5, rtol=1e-5)
    assert got_grads.keys() == want_grads.keys()
    for n, g in want_grads.items():
        torch.testing.assert_close(got_grads[n], g, atol=1e-5, rtol=1e-4, msg=n)


def test_flat_kernel_auto_picks_by_run_length() -> None:
    """ "auto": varlen for long answers (DPO, reference pairs), flex for many short questions (conquer); flex off CUDA
    or in float32; forced modes as set."""
    from types import SimpleNamespace

    from muffin.fast import attention

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    prefix = list(range(1, 601))
    pairs = pack_groups([[prefix + [1000 + j] + [7] * 200 for j in range(2)]] * 4, [10**9] * 4, 0)
    questions = pack_groups([[prefix + [1000 + j] + [7] * 15 for j in range(20)]] * 2, [10**9] * 2, 0)
    fam = SimpleNamespace(fast=FastPath(packed_attention="auto"), model=None)
    have = attention.varlen_attn is not None
    assert flat_kernel(fam, pairs, cuda, torch.bfloat16) == ("varlen" if have else "flex")
    assert flat_kernel(fam, questions, cuda, torch.bfloat16) == "flex"
    assert flat_kernel(fam, pairs, cpu, torch.bfloat16) == "flex"
    assert flat_kernel(fam, pairs, cuda, torch.float32) == "flex"
    for mode in ("flex", "varlen"):
        fam.fast.packed_attention = mode
        assert flat_kernel(fam, questions, cpu, torch.float32) == mode
    # head sizes FlashAttention-2 has no kernel for stay on flex
    fam.fast.packed_attention = "auto"
    for head_dim, want in ((128, "varlen" if have else "flex"), (288, "flex"), (100, "flex")):
        fam.model = SimpleNamespace(config=SimpleNamespace(head_dim=head_dim))
        assert flat_kernel(fam, pairs, cuda, torch.bfloat16) == want, head_dim


@pytest.mark.gpu
def test_varlen_kernel_equals_reference_and_flex_on_gpu(tiny_llava, pairs, grad_pass) -> None:
    """CUDA, bf16: the FlashAttention varlen kernel against ``segment_attention_ref`` on a pipeline-like flat row,
    forward and backward; then the tiny model's log-probs and gradients on the varlen and the flex flat rows agree
    within bf16 rounding, both near the plain path."""
    from muffin.fast.varlen import segment_attention, segment_attention_ref

    gen = torch.Generator().manual_seed(0)
    doc, seg = doc_seg_of(random_groups(gen, 6), 1)
    plan = varlen_plan(doc, seg).to(torch.device("cuda"))
    q, k, v = (torch.randn(len(doc), 4, 64, generator=gen).cuda().bfloat16().requires_grad_() for _ in range(3))
    dout = torch.randn(len(doc), 4, 64, generator=gen).cuda().bfloat16()
    res = []
    for fn in (segment_attention, segment_attention_ref):
        out = fn(q, k, v, plan)
        (g,) = [torch.autograd.grad(out, (q, k, v), dout)]
        res.append((out.float(), [t.float() for t in g]))
    torch.testing.assert_close(res[0][0], res[1][0], atol=2e-2, rtol=2e-2)
    for a, b in zip(res[0][1], res[1][1]):
        torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)
    out = {}
    for mode in ("varlen", "flex", "plain"):
        fam = load_family(tiny_llava, device="cuda", dtype=torch.bfloat16)
        fam.fast.packed_attention = "flex" if mode == "plain" else mode
        logps, grads = grad_pass(fam, pairs, packed=mode != "plain")
        out[mode] = (logps.sums.detach(), grads)
    torch.testing.assert_close(out["varlen"][0].float(), out["flex"][0].float(), atol=0.1, rtol=2e-2)
    torch.testing.assert_close(out["varlen"][0].float(), out["plain"][0].float(), atol=0.1, rtol=2e-2)
    # relative to each gradient, or to 1% of the largest where a gradient is zero in exact arithmetic (key biases)
    scale = max(float(g.float().norm()) for g in out["flex"][1].values())
    for n, g in out["flex"][1].items():
        rel = (out["varlen"][1][n].float() - g.float()).norm() / max(float(g.float().norm()), 0.01 * scale)
        assert rel < 0.05, (n, float(rel))


def test_varlen_row_on_an_lm_loaded_with_flex_attention(tiny_llava, pairs, monkeypatch) -> None:
    """An LM that runs transformers' flex_attention gets the varlen row through the same FlashAttention path (its
    flex function would otherwise read the placeholder BlockMask): the same log-probs as under sdpa."""
    from muffin.fast import attention

    fam = load_family(tiny_llava, device="cpu", dtype=torch.float32)
    fam.fast.packed_attention = "varlen"
    seen = []
    real = attention._varlen_forward
    monkeypatch.setattr(attention, "_varlen_forward", lambda *a, **k: seen.append(1) or real(*a, **k))
    with torch.no_grad():
        sdpa = packed_answer_logps(fam, pairs).sums
        n = len(seen)
        fam.model.config.get_text_config()._attn_implementation = "flex_attention"
        flex = packed_answer_logps(fam, pairs).sums
    assert n > 0 and len(seen) == 2 * n
    torch.testing.assert_close(flex, sdpa, atol=1e-6, rtol=1e-6)


def _lora_family(path, dropout: float = 0.05):
    """The tiny LLaVA with LoRA as the paper sets it (dropout 0.05), random B (so the adapters change the output),
    varlen flat row, compiled layers, transformers' gradient checkpointing on, train mode."""
    from types import SimpleNamespace

    from muffin.train.trainer import prepare_model

    torch.manual_seed(0)
    fam = load_family(path, device="cpu", dtype=torch.float32)
    prepare_model(
        fam, SimpleNamespace(use_lora=True, lora_r=8, lora_alpha=16, lora_dropout=dropout, freeze_vision=True)
    )
    gen = torch.Generator().manual_seed(1)
    for n, p in fam.model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02, generator=gen)
    fam.fast.packed_attention = "varlen"
    fam.fast.compile_layers = True
    fam.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return fam


def test_checkpointing_inside_the_compiled_layer(tiny_llava, pairs, monkeypatch) -> None:
    """A checkpointed layer is compiled with the checkpoint inside its graph, on every transformers version (5.17
    checkpoints around ``__call__``, newer 5.x inside ``forward``): each traced graph holds the checkpoint, each
    layer's graph runs once per step (the recomputation is the checkpoint's, inside the graph), transformers' own
    flag is switched back on after the step. A layer left out of checkpointing (``--checkpoint_layers``) is compiled
    without it. LoRA dropout 0.05 as the paper sets it."""
    import torch._dynamo

    from muffin.fast import compiled_layers

    graphs, runs, flags = [], [], []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        flags.append([layer.gradient_checkpointing for layer in layers])  # transformers' own, while tracing
        return lambda *a: runs.append(1) or gm.forward(*a)

    monkeypatch.setattr(compiled_layers, "COMPILE_BACKEND", recording_backend)
    torch._dynamo.reset()
    fam = _lora_family(tiny_llava)
    layers = fam.decoder_layers()
    layers[-1].gradient_checkpointing = False  # as --checkpoint_layers 1 leaves it on a two-layer model
    fam.model.train()
    packed_answer_logps(fam, pairs).sums.sum().backward()
    assert len(graphs) == len(layers) == 2  # one per layer here: one checkpointed, one not
    with_checkpoint = ["checkpoint" in " ".join(str(n.target) for n in gm.graph.nodes) for gm in graphs]
    assert with_checkpoint == [True, False]
    assert len(runs) == len(layers)
    assert flags == [[False, False]] * 2  # transformers' checkpointing off while ours runs inside the graph
    lora_grads = [p.grad for n, p in fam.model.named_parameters() if "lora_A" in n]
    assert lora_grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in lora_grads)
    assert [layer.gradient_checkpointing for layer in layers] == [True, False]
    assert not any(getattr(layer, "_checkpoint_inside", False) for layer in layers)


@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_compiled_checkpointed_layers_equal_eager(dropout, tiny_llava, pairs, grad_pass, monkeypatch) -> None:
    """The compiled layers with the checkpoint inside, through AOT autograd's decompositions and its min-cut
    partitioner (the one inductor uses, which choose what the backward recomputes; torch 2.11's failed on torch's
    own dropout here), give the same log-probs and gradients as the same graphs run eagerly and as the compiled
    layers without checkpointing (the same seeds, so the same dropout masks: a recomputation that drew other masks
    than the forward would differ from the latter), over two steps. Without dropout all equal the plain path (eager
    layers, transformers' checkpointing around each)."""
    import torch._dynamo

    from muffin.fast import compiled_layers

    def run(backend, checkpointing=True):
        monkeypatch.setattr(compiled_layers, "COMPILE_BACKEND", backend)
        torch._dynamo.reset()
        fam = _lora_family(tiny_llava, dropout)
        if backend is None:
            fam.fast.compile_layers = False
        if not checkpointing:
            fam.model.gradient_checkpointing_disable()
        for _ in range(2):
            out, grads = grad_pass(fam, pairs, packed=backend is not None)
        return out.sums.detach(), grads

    want = run("eager")
    # the same masks with checkpointing off: the recomputation draws what the forward drew
    runs = [run("aot_eager_decomp_partition"), run("aot_eager_decomp_partition", checkpointing=False)]
    for got in runs + ([run(None)] if dropout == 0 else []):
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
        assert got[1].keys() == want[1].keys() and any("lora_A" in n for n in want[1])
        for n, g in want[1].items():
            torch.testing.assert_close(got[1][n], g, rtol=1e-4, atol=1e-5, msg=n)


def test_graph_break_in_a_checkpointed_layer_runs_it_eagerly(tiny_llava, pairs, grad_pass, monkeypatch, caplog):
    """A layer that dynamo cannot trace whole (here: a graph break in the attention, which the whole-layer trace of
    the checkpoint refuses) runs eagerly under torch's checkpoint instead, with a warning, and torch's dropout:
    from the same generator state, the same log-probs and gradients as eager layers (``compile_layers = False``)."""
    import logging

    import torch._dynamo

    from muffin.fast import attention, compiled_layers

    monkeypatch.setattr(compiled_layers, "COMPILE_BACKEND", "eager")

    def run(compile_layers):
        torch._dynamo.reset()
        fam = _lora_family(tiny_llava, 0.05)
        fam.fast.compile_layers = compile_layers
        grad_pass(fam, pairs, packed=True)  # the first step tries the compilation and falls back
        torch.manual_seed(7)
        return fam, grad_pass(fam, pairs, packed=True)

    _, (want_out, want_grads) = run(False)
    seen = []
    real = attention._varlen_forward

    def breaking(*args, **kwargs):
        torch._dynamo.graph_break()
        seen.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(attention, "_varlen_forward", breaking)
    with caplog.at_level(logging.WARNING, logger="muffin.fast.compiled_layers"):
        fam, (got_out, got_grads) = run(True)
    assert seen and all(layer._checkpoint_eager for layer in fam.decoder_layers())
    assert caplog.text.count("does not compile under gradient checkpointing") == len(fam.decoder_layers())
    torch.testing.assert_close(got_out.sums.detach(), want_out.sums.detach(), rtol=1e-5, atol=1e-5)
    assert got_grads.keys() == want_grads.keys()
    for n, g in want_grads.items():
        torch.testing.assert_close(got_grads[n], g, rtol=1e-4, atol=1e-5, msg=n)


def test_an_error_in_a_layer_is_raised_not_taken_for_a_graph_break(tiny_llava, pairs, monkeypatch) -> None:
    """An error raised inside the layer reaches the caller as itself; the layer is not switched to eager for good."""
    import torch._dynamo

    from muffin.fast import attention, compiled_layers

    monkeypatch.setattr(compiled_layers, "COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    fam = _lora_family(tiny_llava, 0.05)
    fam.model.train()

    def broken(*a, **k):
        raise RuntimeError("the attention kernel failed")

    monkeypatch.setattr(attention, "_varlen_forward", broken)
    with pytest.raises(RuntimeError, match="the attention kernel failed"):
        packed_answer_logps(fam, pairs)
    assert not any(getattr(layer, "_checkpoint_eager", False) for layer in fam.decoder_layers())
    assert all(layer.gradient_checkpointing and not layer._checkpoint_inside for layer in fam.decoder_layers())


def test_checkpointed_layers_trace_to_one_graph(tiny_llava, pairs, monkeypatch) -> None:
    """Every checkpointed layer traces to the same graph (the dropout salts do not differ between layers), so a
    7B model compiles once, not 32 times."""
    import torch._dynamo

    from muffin.fast import compiled_layers

    graphs = []
    monkeypatch.setattr(compiled_layers, "COMPILE_BACKEND", lambda gm, example_inputs: graphs.append(gm) or gm.forward)
    torch._dynamo.reset()
    fam = _lora_family(tiny_llava, 0.05)
    fam.model.train()
    packed_answer_logps(fam, pairs).sums.sum().backward()
    assert len(fam.decoder_layers()) == 2 and len(graphs) == 1


def test_checkpointed_layer_saves_only_its_inputs(tiny_llava, pairs, monkeypatch) -> None:
    """What the compiled, checkpointed layer keeps for the backward, as AOT autograd's min-cut partitioner (inductor's)
    cuts it with LoRA dropout 0.05: no activation besides the layer's own output and its inputs, i.e. the dropout
    masks and dropped inputs are recomputed in the backward, not stored (a symbolic ``p`` once made them stored:
    +17 GiB on the 7B LoRA step)."""
    import torch._dynamo
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    from muffin.fast import compiled_layers

    kept = []

    def forward_compiler(gm, example_inputs):
        (outputs,) = [n for n in gm.graph.nodes if n.op == "output"][0].args
        kept.append(
            [
                o
                for o in outputs
                if isinstance(o, torch.fx.Node)
                and any(isinstance(d, torch.SymInt) for d in getattr(o.meta["val"], "shape", ()))
            ]
        )
        return gm.forward

    backend = aot_autograd(
        fw_compiler=forward_compiler,
        bw_compiler=lambda gm, example_inputs: gm.forward,
        partition_fn=min_cut_rematerialization_partition,
    )
    monkeypatch.setattr(compiled_layers, "COMPILE_BACKEND", backend)
    torch._dynamo.reset()
    fam = _lora_family(tiny_llava, 0.05)
    fam.model.train()
    packed_answer_logps(fam, pairs).sums.sum().backward()
    assert kept
    for activations in kept:  # the layer output, then its saved tensors whose size follows the row: inputs only
        computed = [o for o in activations[1:] if o.op != "placeholder"]
        assert activations[0].op != "placeholder" and not computed, [o.name for o in computed]
