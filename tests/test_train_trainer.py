"""DPO trainer on a tiny LLaVA (CPU): what trains, LoRA checkpoints, resume, the reference cache, the loss wiring."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from test_train_data import write_rlaifv_parquet
from transformers import TrainerCallback

from muffin.family import Sample, load_family
from muffin.inference import answer_logps
from muffin.train.args import DPOConfig
from muffin.train.data import PreferenceDataset
from muffin.train.loss import ddpo_token_weights
from muffin.train.train_dpo import build_trainer, train


def config(tmp: Path, model: Path, data: Path, **kw) -> DPOConfig:
    base = dict(
        output_dir=str(tmp / "out"),
        model_path=str(model),
        data=str(data),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        seed=0,
        logging_steps=1,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    base.update(kw)
    return DPOConfig(**base)


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    return write_rlaifv_parquet(tmp_path / "data", n=4)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_full_training_changes_every_trainable_parameter(tmp_path: Path, tiny_llava: Path, data_dir: Path) -> None:
    trainer = build_trainer(config(tmp_path, tiny_llava, data_dir))
    before = snapshot(trainer.model)
    trainer.train()
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and not any(n.startswith("model.vision_tower.") for n in trainable)
    for n, p in trainer.model.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        assert changed == (n in trainable), f"{n}: changed={changed}, trainable={n in trainable}"
    logged = trainer.state.log_history[0]
    for key in (
        "loss",
        "learning_rate",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/ref_chosen",
        "logps/rejected",
        "logps/ref_rejected",
    ):
        assert key in logged, key
    # step 1: policy == reference, so every reward is 0 and the loss is log 2
    assert logged["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert logged["logps/chosen"] == pytest.approx(logged["logps/ref_chosen"], abs=1e-4)


def test_lora_trains_adapters_and_projector_only_and_checkpoint_loads(
    tmp_path: Path, tiny_llava: Path, data_dir: Path
) -> None:
    trainer = build_trainer(config(tmp_path, tiny_llava, data_dir, use_lora=True, lora_dropout=0.0))
    model = trainer.family.model
    before = snapshot(model)
    trainer.train()
    for n, p in model.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        if "lora_" in n or n.startswith("model.multi_modal_projector."):
            assert changed, f"{n} did not change"
        else:
            assert not changed, f"base weight {n} changed"  # bit-identical
    ckpt = tmp_path / "ckpt"
    trainer.save_model(str(ckpt))
    assert {"adapter_config.json", "adapter_model.safetensors", "non_lora_trainables.safetensors"} <= {
        p.name for p in ckpt.iterdir()
    }
    cfg = json.loads((ckpt / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"]) == (64, 16)
    # the evaluators' loader merges adapter + projector: same log-probs as the trained (unmerged) model
    merged = load_family(tiny_llava, device="cpu", lora_path=ckpt)
    ds = PreferenceDataset(data_dir)
    samples = [Sample(ds[i]["image"], ds[i]["question"], ds[i]["chosen"]) for i in range(2)]
    model.eval()
    ours = [x.sum for x in answer_logps(trainer.family, samples)]
    theirs = [x.sum for x in answer_logps(merged, samples)]
    base = [x.sum for x in answer_logps(load_family(tiny_llava, device="cpu"), samples)]
    assert ours == pytest.approx(theirs, abs=1e-4)
    assert ours != pytest.approx(base, abs=1e-4)


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


@pytest.mark.parametrize("use_lora", [False, True])
def test_resume_continues_the_same_run(tmp_path: Path, tiny_llava: Path, data_dir: Path, use_lora: bool) -> None:
    """4 steps straight == 2 steps, stop, restart in the same output_dir (auto-resume from checkpoint-2), 2 more."""
    kw = dict(
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
        per_device_train_batch_size=1,
        use_lora=use_lora,
        lora_dropout=0.05,
        learning_rate=1e-3,
    )
    straight = train(config(tmp_path / "a", tiny_llava, data_dir, **kw))
    first = build_trainer(config(tmp_path / "b", tiny_llava, data_dir, **kw))
    first.add_callback(StopAt(2))
    first.train()
    assert first.state.global_step == 2 and (tmp_path / "b" / "out" / "checkpoint-2").is_dir()
    resumed = train(config(tmp_path / "b", tiny_llava, data_dir, **kw))
    assert resumed.state.global_step == 4
    losses_a = [h["loss"] for h in straight.state.log_history if "loss" in h]
    losses_b = [h["loss"] for h in resumed.state.log_history if "loss" in h]
    assert losses_b == pytest.approx(losses_a, abs=1e-6)
    a, b = snapshot(straight.family.model), snapshot(resumed.family.model)
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=1e-6, rtol=0, msg=n)


def test_reference_cache_reused_and_refused(
    tmp_path: Path, tiny_llava: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from muffin.train import reference

    trainer = build_trainer(config(tmp_path, tiny_llava, data_dir))
    cache = Path(str(data_dir) + ".logps")
    assert (cache / "fingerprint.json").is_file() and (cache / "logps.parquet").is_file()
    # the cache holds the model's log-probs of each answer, as the single-sample inference path computes them
    fam = load_family(tiny_llava, device="cpu")
    ds = PreferenceDataset(data_dir)
    expected = answer_logps(fam, [Sample(ds[1]["image"], ds[1]["question"], ds[1]["rejected"])])[0]
    cached = trainer.train_dataset.ref_logps[1]
    assert len(cached) == 6 and cached[3] == pytest.approx(expected.sum, abs=1e-4)
    assert cached[4] == pytest.approx(expected.mean, abs=1e-5) and cached[5] == pytest.approx(
        expected.per_token, abs=1e-5
    )
    # nothing changed: reused, not recomputed
    monkeypatch.setattr(reference, "build_reference_logps", lambda *a, **k: pytest.fail("cache was recomputed"))
    build_trainer(config(tmp_path, tiny_llava, data_dir))
    # another model (same architecture, other weights): refused, naming the model
    from utils.tiny_models import build_tiny

    other = build_tiny("llava", tmp_path / "other-model", seed=1)
    with pytest.raises(ValueError, match=r"different model .*Recompute them: python -m muffin.train.reference"):
        build_trainer(config(tmp_path, other, data_dir))
    # changed data: refused, naming the data
    changed = tmp_path / "changed"
    shutil.copytree(data_dir, changed)
    write_rlaifv_parquet(changed, n=3)
    with pytest.raises(ValueError, match=r"different data"):
        build_trainer(config(tmp_path, tiny_llava, changed, logps_dir=str(cache)))
    with pytest.raises(ValueError, match=r"different max_length"):
        build_trainer(config(tmp_path, tiny_llava, data_dir, model_max_length=1000))


def test_loss_wiring_matches_independent_computation(tmp_path: Path, tiny_llava: Path, data_dir: Path) -> None:
    """Averaged, DDPO-weighted (gamma 5) IPO with an SFT term, recomputed from single-sample log-probs by hand.

    Policy = perturbed copy of the reference so that h != 0; per-token log-probs of each answer come from
    muffin.inference.answer_logps (one sample at a time), weights from ddpo_token_weights on the answer token ids.
    """
    args = config(
        tmp_path, tiny_llava, data_dir, loss_type="ipo", use_average=True, ddpo_gamma=5.0, sft_weight=0.3, beta=0.5
    )
    trainer = build_trainer(args)
    fam = trainer.family
    torch.manual_seed(0)
    with torch.no_grad():
        for p in fam.model.model.multi_modal_projector.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ds = trainer.train_dataset
    batch = trainer.data_collator([ds[0], ds[2]])
    fam.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(fam.model, batch).item()
    per_pair, chosen_means = [], []
    for i in (0, 2):
        rec = ds[i]
        pol_c, pol_r = answer_logps(
            fam, [Sample(rec["image"], rec["question"], rec[k]) for k in ("chosen", "rejected")]
        )
        ids_c, ids_r = (fam.encode([Sample(rec["image"], rec["question"], rec[k])]) for k in ("chosen", "rejected"))
        ans_c = ids_c["input_ids"][0][ids_c["answer_mask"][0]].tolist()
        ans_r = ids_r["input_ids"][0][ids_r["answer_mask"][0]].tolist()
        wc, wr = ddpo_token_weights(ans_c, ans_r, 5.0)

        def wmean(values: list[float], w: list[float]) -> float:
            return sum(v * x for v, x in zip(values, w)) / sum(w)

        ref = rec["ref_logps"]
        h = (wmean(pol_c.per_token, wc) - wmean(pol_r.per_token, wr)) - (wmean(ref[2], wc) - wmean(ref[5], wr))
        per_pair.append((h - 1 / (2 * 0.5)) ** 2)
        chosen_means.append(wmean(pol_c.per_token, wc))
    expected = sum(per_pair) / 2 + 0.3 * -(sum(chosen_means) / 2)
    assert loss == pytest.approx(expected, abs=1e-4)
    assert any(abs(x - 1.0) > 1e-3 for x in per_pair)  # h != 0: the policy really differs from the reference


def test_packed_and_plain_training_follow_the_same_run(tmp_path: Path, tiny_llava: Path, data_dir: Path) -> None:
    """Three steps with the shared-prefix fast path and three with two sequences per pair: the same losses (to
    float rounding) and the same weight updates. Updates are compared per tensor in norm (1%): Adam turns float
    noise on near-zero gradients into element-wise differences of order lr, so element-wise equality is no test."""
    runs = []
    for packing in (True, False):
        trainer = build_trainer(config(tmp_path / str(packing), tiny_llava, data_dir, packing=packing, max_steps=3))
        assert trainer.packed is packing
        batch = trainer.data_collator([trainer.train_dataset[0]])
        assert ("packing_plan" in batch) is packing  # the collator plans only when the trainer packs
        if packing:  # a wrapper the packed path would bypass (replicas would share per-call state) is refused
            with pytest.raises(RuntimeError, match="--packing False"):
                trainer.compute_loss(torch.nn.DataParallel(trainer.model), batch)
        before = snapshot(trainer.model)
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        after = snapshot(trainer.model)
        runs.append((losses, {n: after[n] - before[n] for n in after}))
    (l_fast, d_fast), (l_plain, d_plain) = runs
    assert len(l_fast) == 3 and l_fast == pytest.approx(l_plain, abs=1e-5)
    assert l_fast[-1] != pytest.approx(l_fast[0], abs=1e-3)  # training moved the policy
    moved = 0
    for n, dp in d_plain.items():
        if dp.norm() == 0:
            assert d_fast[n].norm() == 0, n
            continue
        moved += 1
        assert (d_fast[n] - dp).norm() <= 0.01 * dp.norm(), n
    assert moved > 10


@pytest.mark.parametrize("packed", [True, False])
def test_lora_on_bf16_model_computes_in_bf16_with_float32_adapters(tiny_llava: Path, packed: bool) -> None:
    """On a bf16 model, prepare_model keeps the LoRA weights float32 but stops peft from casting activations to
    float32: the step runs under bf16 autocast (gradient checkpointing replays it), the adapters get float32
    gradients, and the log-probs are as close to a float32 model's as those of peft's float32-adapter path."""
    from types import SimpleNamespace

    from muffin.train.data import PairCollator
    from muffin.train.peft_patch import lora_compute_dtype, set_lora_input_casting
    from muffin.train.policy import concatenated_logps
    from muffin.train.trainer import prepare_model

    pairs = [
        {"image": None, "question": "Describe the image.", "chosen": "A red circle.", "rejected": "A dog.", "idx": 0},
        {"image": None, "question": "Is there a cup?", "chosen": "Yes, a cup.", "rejected": "No.", "idx": 1},
    ]
    from PIL import Image

    for i, p in enumerate(pairs):
        p["image"] = Image.new("RGB", (30, 24), (40 * i, 200, 90))
    lora = SimpleNamespace(use_lora=True, lora_r=8, lora_alpha=16, lora_dropout=0.0, freeze_vision=True)
    out = {}
    for mode in ("autocast", "peft", "float32"):
        dtype = torch.float32 if mode == "float32" else torch.bfloat16
        fam = load_family(tiny_llava, device="cpu", dtype=dtype)
        torch.manual_seed(0)  # the same lora_A initialisation in every mode
        prepare_model(fam, lora)
        adapters = {n: p for n, p in fam.model.named_parameters() if "lora_" in n}
        assert adapters and all(p.dtype == torch.float32 for p in adapters.values())
        assert lora_compute_dtype(fam.model) == (None if mode == "float32" else torch.bfloat16)
        if mode == "peft":  # peft's own behaviour: float32 adapters, activations cast to float32
            set_lora_input_casting(fam.model, True)
            assert lora_compute_dtype(fam.model) is None
        for n, p in adapters.items():  # lora_B starts at zero: give it values so the adapters change the output
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(len(n)))
        fam.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        fam.model.train()
        batch = PairCollator(fam, max_length=128, packing=packed)([dict(p, row=i) for i, p in enumerate(pairs)])
        logps, mask = concatenated_logps(fam, batch, packed=packed, compute_dtype=lora_compute_dtype(fam.model))
        (logps * mask).sum().backward()
        grads = {n: p.grad for n, p in adapters.items()}
        assert all(g is not None and g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads.values())
        out[mode] = logps[mask].detach().float()
    err_autocast = (out["autocast"] - out["float32"]).abs().max()
    err_peft = (out["peft"] - out["float32"]).abs().max()
    assert err_autocast <= 1.5 * err_peft + 0.02, (err_autocast, err_peft)


def test_fused_lora_forward_equals_peft() -> None:
    """set_lora_fusion: addmm(base(x), A(dropout(x)), (s B)^T) gives peft's outputs and gradients (float32, with
    dropout under one seed), stays within bf16 rounding of them under autocast, and falls back to peft's forward
    when switched off or when several adapters are active."""
    from peft import LoraConfig, get_peft_model
    from torch.utils._python_dispatch import TorchDispatchMode

    from muffin.train.peft_patch import set_lora_fusion

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = torch.nn.Linear(16, 24, bias=False)
            self.down = torch.nn.Linear(24, 8, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.down(torch.relu(self.up(x)))

    class CountAddmm(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountAddmm.n += func is torch.ops.aten.addmm.default
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = get_peft_model(Net(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.25, target_modules=["up", "down"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.3)
    model.train()
    x = torch.randn(3, 5, 16)

    def run(fused: bool, autocast: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        assert set_lora_fusion(model, fused) == 2
        model.zero_grad()
        torch.manual_seed(7)  # the same dropout masks in both paths
        CountAddmm.n = 0
        with CountAddmm(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = model(x)
        (y.float() ** 2).sum().backward()
        assert CountAddmm.n == (2 if fused else 0)
        return y.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    y_peft, g_peft = run(False)
    y_fused, g_fused = run(True)
    assert torch.allclose(y_fused, y_peft, atol=1e-5)
    assert g_fused.keys() == g_peft.keys() and len(g_peft) == 4
    for n in g_peft:
        assert torch.allclose(g_fused[n], g_peft[n], atol=1e-4, rtol=1e-4), n
    y_peft16, _ = run(False, autocast=True)
    y_fused16, _ = run(True, autocast=True)
    assert (y_fused16 - y_peft).abs().max() <= 2 * (y_peft16 - y_peft).abs().max() + 1e-3

    model.add_adapter("second", LoraConfig(r=2, target_modules=["up", "down"]))
    model.base_model.set_adapter(["default", "second"])
    set_lora_fusion(model, True)
    CountAddmm.n = 0
    with CountAddmm():
        model(x)
    assert CountAddmm.n == 0  # two active adapters: peft's own forward


def test_fused_lora_forward_inside_compile_adds_unfused() -> None:
    """Traced by dynamo (as in a compiled decoder layer), the fused LoRA forward adds the low-rank term with a plain
    add (no addmm in the graph: inductor fuses the add into the next kernel) and still gives peft's outputs and
    gradients (float32, the same dropout masks)."""
    import torch._dynamo
    from peft import LoraConfig, get_peft_model

    from muffin.train.peft_patch import set_lora_fusion

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.manual_seed(0)
    model = get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(16, 24, bias=False)),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.25, target_modules=["0"]),
    )
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.3)
    model.train()
    x = torch.randn(3, 5, 16)
    results = []
    for compiled in (False, True):
        set_lora_fusion(model, compiled)  # peft's own forward eagerly; ours traced
        model.zero_grad()
        torch.manual_seed(7)
        torch._dynamo.reset()
        y = torch.compile(model, backend=backend)(x) if compiled else model(x)
        (y**2).sum().backward()
        results.append((y.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    assert graphs and not any(
        node.target in (torch.addmm, torch.ops.aten.addmm.default) for gm in graphs for node in gm.graph.nodes
    )
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-5)
    for n, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][n], g, atol=1e-4, rtol=1e-4, msg=n)


def test_checkpoint_layers_leaves_later_layers_unchecked_and_trains_the_same(
    tmp_path: Path, tiny_llava: Path, data_dir: Path
) -> None:
    """``--checkpoint_layers 1``: the first decoder layer stays checkpointed, the others run without recomputation,
    and training ends at the same weights as checkpointing every layer (full fine-tuning: no dropout)."""
    results = {}
    for n in (-1, 1):
        trainer = build_trainer(
            config(tmp_path / str(n), tiny_llava, data_dir, gradient_checkpointing=True, checkpoint_layers=n)
        )
        calls: list[int] = []
        trainer.add_callback(_RecordCheckpointing(trainer, calls))
        trainer.train()
        flags = [layer.gradient_checkpointing for layer in trainer.family.decoder_layers()]
        results[n] = (flags, snapshot(trainer.model), calls)
    n_layers = len(results[-1][0])
    assert n_layers >= 2
    assert results[-1][0] == [True] * n_layers
    assert results[1][0] == [True] + [False] * (n_layers - 1)
    assert results[-1][2] and set(results[-1][2]) == set(range(n_layers))  # every layer went through checkpoint
    assert results[1][2] and set(results[1][2]) == {0}
    for name, w in results[-1][1].items():
        torch.testing.assert_close(results[1][1][name], w, atol=1e-6, rtol=1e-5, msg=name)


class _RecordCheckpointing(TrainerCallback):
    """Wraps each decoder layer's checkpoint function once the Trainer has set it, recording which layer used it."""

    def __init__(self, trainer, calls: list[int]) -> None:
        self.trainer, self.calls = trainer, calls

    def on_step_begin(self, args, state, control, **kwargs):
        for i, layer in enumerate(self.trainer.family.decoder_layers()):
            fn = layer._gradient_checkpointing_func
            if not getattr(fn, "_recorded", False):

                def wrapped(*a, _fn=fn, _i=i, **k):
                    self.calls.append(_i)
                    return _fn(*a, **k)

                wrapped._recorded = True
                layer._gradient_checkpointing_func = wrapped


def test_checkpoint_layers_is_validated(tmp_path: Path, tiny_llava: Path, data_dir: Path) -> None:
    from utils.tiny_models import build_tiny

    with pytest.raises(ValueError, match="checkpoint_layers must be -1"):
        config(tmp_path, tiny_llava, data_dir, checkpoint_layers=-2)
    with pytest.raises(ValueError, match="compile_layers must be auto, true or false, got 'yes'"):
        config(tmp_path, tiny_llava, data_dir, compile_layers="yes")
    omni = build_tiny("omnilmm", tmp_path / "omni")
    with pytest.raises(ValueError, match="does not list its decoder layers"):
        build_trainer(config(tmp_path, omni, data_dir, checkpoint_layers=1))


@pytest.mark.parametrize(
    ("distributed", "multi_device", "n_gpu", "zero_stage", "allowed"),
    [
        ("NO", False, 1, None, True),  # one process, one device
        ("MULTI_GPU", True, 1, None, False),  # torchrun: accelerate wraps the model in DDP
        ("MULTI_CPU", False, 1, None, False),  # DDP on CPU processes
        ("NO", False, 2, None, False),  # one process, several GPUs: the Trainer wraps in DataParallel
        ("DEEPSPEED", False, 1, 2, True),  # ZeRO-2: whole weights on every rank, the engine's hooks are gradient-side
        ("DEEPSPEED", False, 1, 3, False),  # ZeRO-3: partitioned weights gathered in forward hooks
    ],
)
def test_launcher_decides_packing(distributed, multi_device, n_gpu, zero_stage, allowed) -> None:
    """The launcher half of the one packing decision, from the launcher's state as accelerate and the Trainer read
    it (the wrapper itself comes later, in accelerator.prepare)."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from muffin.train.trainer import DPOTrainer

    plugin = None if zero_stage is None else SimpleNamespace(zero_stage=zero_stage)
    accelerator = SimpleNamespace(
        multi_device=multi_device,
        distributed_type=DistributedType[distributed],
        state=SimpleNamespace(deepspeed_plugin=plugin),
    )
    fake = SimpleNamespace(accelerator=accelerator, args=SimpleNamespace(n_gpu=n_gpu))
    assert DPOTrainer._launcher_allows_packing(fake) is allowed


def test_compile_setting_follows_the_planned_work() -> None:
    """``for_planned_calls``: "auto" turns eager below COMPILE_MIN_CALLS packed batches and stays "auto" (device
    and width decide) from there or when the count is unknown; true / false are kept; a bad value names the flag."""
    from muffin.fast.compiled_layers import COMPILE_MIN_CALLS, for_planned_calls, parse_compile_layers

    assert for_planned_calls("auto", COMPILE_MIN_CALLS - 1) is False
    assert for_planned_calls("auto", COMPILE_MIN_CALLS) == "auto" and for_planned_calls("auto", None) == "auto"
    assert for_planned_calls("true", 1) is True and for_planned_calls(True, 1) is True
    assert for_planned_calls("False", 10**6) is False
    assert parse_compile_layers("AUTO") == "auto"
    with pytest.raises(ValueError, match="--compile_layers must be auto, true or false"):
        parse_compile_layers("yes")


@pytest.mark.parametrize(
    ("flag", "max_steps", "epochs", "want"),
    [("auto", 2, 1, False), ("auto", 500, 1, "auto"), ("auto", -1, 250, "auto"), ("auto", -1, 249, False),
     ("true", 2, 1, True), ("false", 500, 1, False)],
)  # fmt: skip
def test_trainer_compiles_only_a_run_long_enough(
    tmp_path, tiny_llava, data_dir, monkeypatch, flag, max_steps, epochs, want
):
    """build_trainer sets the family's compile setting once from --compile_layers and the run's planned batches
    (max_steps x accumulation, else epochs x ceil(4 pairs / batch 2) = 2 per epoch: 250 epochs = 500 batches, the
    threshold); the reference stage gets the flag itself and decides on its own batch count (4 pairs / 8 = 1:
    eager under auto), then restores the family's setting."""
    from muffin.train import reference

    seen = []
    real = reference.iter_scores

    def spy(family, *a, **k):
        seen.append(family.fast.compile_layers)
        yield from real(family, *a, **k)

    monkeypatch.setattr(reference, "iter_scores", spy)
    trainer = build_trainer(
        config(tmp_path, tiny_llava, data_dir, compile_layers=flag, max_steps=max_steps, num_train_epochs=epochs)
    )
    assert trainer.family.fast.compile_layers == want and type(trainer.family.fast.compile_layers) is type(want)
    assert seen == [{"auto": False, "true": True, "false": False}[flag]]
