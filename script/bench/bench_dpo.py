"""Benchmark one DPO training step: our packed path vs our plain path vs TRL's DPOTrainer, on one GPU.

    python -m script.bench.bench_dpo --shape 7b --lora --batch-sizes 8 2
    python -m script.bench.bench_dpo --shape 1.5b --batch-sizes 8            # full fine-tuning

All three run the same model object, the same encoded pairs (30-word prompts, 100-250-word answers, images of
300-640 px), bf16 weights, gradient checkpointing, AdamW:
- ours (packed, the default): ``muffin.train.trainer.concatenated_logps`` with the shared-prefix fast path (image +
  prompt encoded once per pair, chunked log-softmax, all pairs of the batch in one row with a FlexAttention block
  mask, decoder layers compiled), reference log-probs cached (no reference forward);
- ours (packed-eager): the same with the decoder layers run eagerly;
- ours (packed-flex): the same with FlexAttention on the flat row instead of FlashAttention varlen;
- ours (packed-dense): the same packing with one row per pair and a dense boolean mask (sdpa), the CPU layout;
- ours (plain): the same with chosen and rejected as two sequences, image encoded twice (the original's way);
- TRL 1.x ``DPOTrainer._compute_loss``: reference computed online (disabled adapter with LoRA, a frozen copy for
  full fine-tuning), as TRL is used for vision data.
Batches are collated before timing (encoding and, for ours, the packing plan: what DataLoader workers do in
training). Steps are timed after 4 warm-up steps (10 steps, CUDA synchronised, median). MFU counts each method's own model
FLOPs without recomputation: 2·N·tokens forward, +2·N·tokens input gradients, +2·N·tokens weight gradients for full
fine-tuning, +2·N·tokens for TRL's online reference; N = language-model matmul parameters; tokens = the non-pad
tokens the method feeds the language model. The denominator is the measured bf16 matmul peak: the rate a GPU
sustains over a step's length (``matmul_peak_tflops``); the column "MFU (burst)" divides by the rate of a short burst
on the idle GPU instead (``matmul_burst_tflops``, the denominator through run 9, higher and noisier). The optimizer is
fused AdamW, the default of transformers' Trainer (which ours and TRL's trainers are).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from types import SimpleNamespace

import torch

from muffin.train.data import PairCollator
from muffin.train.loss import preference_loss, sequence_logps
from muffin.train.peft_patch import lora_compute_dtype, set_lora_fusion, set_lora_input_casting
from muffin.train.policy import concatenated_logps
from muffin.train.trainer import prepare_model
from script.bench.common import build_model, make_pairs, matmul_burst_tflops, matmul_peak_tflops, print_table
from utils.cuda import configure_attention_backends


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="7b", choices=["7b", "1.5b"])
    p.add_argument("--lora", action="store_true", help="LoRA r64/alpha16/dropout0.05 on the LM + trained projector")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument(
        "--warmup",
        type=int,
        default=4,
        help="untimed steps per method (compiled layers recompile for new shapes in the first ones)",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=["packed", "packed-eager", "packed-dense", "plain", "trl", "trl-nocudnn"],
        help="packed-dense: our packing with a row per pair and a dense mask (muffin.fast.packing, CPU layout); "
        "packed-flex: packed with FlexAttention instead of FlashAttention varlen; "
        "packed-eager: packed with the decoder layers run eagerly (not compiled); "
        "trl: TRL with torch's default attention backends (cuDNN SDPA on, as TRL runs); "
        "trl-nocudnn: TRL with our backend setting (utils/cuda.py)",
    )
    return p


def lm_matmul_params(model: torch.nn.Module) -> int:
    lm = sum(p.numel() for n, p in model.named_parameters() if ".language_model.layers." in f".{n}")
    head = sum(p.numel() for n, p in model.named_parameters() if n.endswith("lm_head.weight"))
    return lm + head


def prepare_for_dpo(fam, lora: bool):
    """The DPO benchmarks' training setup: LoRA r64 / alpha 16 / dropout 0.05 on the LM and the projector trained
    (``lora``) or full fine-tuning, vision tower frozen, non-reentrant gradient checkpointing, train mode; and fused
    AdamW over the trainable parameters (HF Trainer's default optimizer). Returns (``prepare_model``'s model, opt)."""
    model = prepare_model(
        fam, SimpleNamespace(use_lora=lora, lora_r=64, lora_alpha=16, lora_dropout=0.05, freeze_vision=True)
    )
    fam.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    fam.model.train()
    params = [p for p in fam.model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-7, weight_decay=0.01, fused=True)


def pair_batches(fam, pairs: list, batch_size: int, max_length: int = 2048) -> list[dict]:
    """``make_pairs`` output collated into training batches of ``batch_size`` pairs (``PairCollator``, with the packing
    plan), before any timing: what DataLoader workers do in training."""
    collate = PairCollator(fam, max_length=max_length, packing=True)
    return [
        collate(
            [
                {
                    "image": c.image,
                    "question": c.question,
                    "chosen": c.answer,
                    "rejected": r.answer,
                    "idx": i,
                    "row": i,
                }
                for i, (c, r) in enumerate(pairs[s : s + batch_size])
            ]
        )
        for s in range(0, len(pairs), batch_size)
    ]


def ours_step(fam, opt, batch: dict, packed: bool) -> None:
    # float32 LoRA adapters compute in the model's dtype under autocast, as DPOTrainer runs them
    per_token, mask = concatenated_logps(fam, batch, packed=packed, compute_dtype=lora_compute_dtype(fam.model))
    policy = sequence_logps(per_token, mask)
    n = policy.shape[0] // 2
    ref = policy.detach() - 1.0  # cached reference log-probs: constants
    out = preference_loss(policy[:n], policy[n:], ref[:n], ref[n:], beta=0.1)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def trl_trainer(fam, model, full: bool, tmp: str):
    import trl
    from datasets import Dataset
    from PIL import Image
    from transformers import LlavaProcessor

    processor = LlavaProcessor(
        image_processor=fam.image_processor,
        tokenizer=fam.tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    dummy = Dataset.from_dict(
        {"prompt": ["q"], "chosen": [" a"], "rejected": [" b"], "image": [Image.new("RGB", (32, 32))]}
    )
    ref = copy.deepcopy(fam.model).eval().requires_grad_(False) if full else None
    return trl.DPOTrainer(
        model=model,
        ref_model=ref,
        processing_class=processor,
        train_dataset=dummy,
        args=trl.DPOConfig(
            output_dir=tmp,
            report_to="none",
            beta=0.1,
            loss_type=["sigmoid"],
            bf16=True,
            precompute_ref_log_probs=False,
            gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        ),
    )


def trl_step(trainer, opt, batch: dict) -> None:
    inputs = {
        "input_ids": batch["input_ids"].cuda(),
        "attention_mask": batch["attention_mask"].cuda(),
        "completion_mask": batch["answer_mask"].long().cuda(),
        "pixel_values": batch["pixel_values"].cuda().to(torch.bfloat16),
    }
    # bf16 autocast around the forward, as accelerate wraps the model's forward in Trainer.train with bf16=True
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = trainer._compute_loss(trainer.model, inputs, False)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def main() -> None:
    args = make_parser().parse_args()
    burst = matmul_burst_tflops()  # first, on the idle GPU, as it was measured through run 9
    peak = matmul_peak_tflops()
    fam = build_model(args.shape)
    full = not args.lora
    model, opt = prepare_for_dpo(fam, args.lora)
    n_lm = lm_matmul_params(fam.model)
    use_trl = any(m.startswith("trl") for m in args.methods)
    trainer = trl_trainer(fam, model, full, "/tmp/trl-bench") if use_trl else None
    rows = []
    for bs in args.batch_sizes:
        batches = pair_batches(fam, make_pairs(bs * (args.steps + args.warmup), seed=bs), bs)
        plain_tokens = statistics.mean(int(b["attention_mask"].sum()) for b in batches)
        prefix = statistics.mean(int(b["attention_mask"][:bs].sum() - b["answer_mask"][:bs].sum()) for b in batches)
        packed_tokens = plain_tokens - prefix  # each pair's prompt (image tokens included) once, not twice
        for method in args.methods:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            configure_attention_backends(cudnn_sdp=method == "trl")
            fam.fast.packed_attention = {"packed-dense": "dense", "packed-flex": "flex"}.get(method, "auto")
            # compiled decoder layers: ours by default
            fam.fast.compile_layers = "auto" if method in ("packed", "packed-flex") else False
            # peft casts LoRA inputs to float32 as TRL runs it; prepare_model turns that off for ours (autocast instead)
            set_lora_input_casting(fam.model, method.startswith("trl"))
            if args.lora:  # and runs peft's own LoRA forward for TRL, the fused one (set_lora_fusion) for ours
                set_lora_fusion(fam.model, not method.startswith("trl"))
            times = []
            for k, batch in enumerate(batches):
                torch.cuda.synchronize()
                t = time.perf_counter()
                if method.startswith("trl"):
                    trl_step(trainer, opt, batch)
                else:
                    ours_step(fam, opt, batch, packed=method.startswith("packed"))
                torch.cuda.synchronize()
                if k >= args.warmup:
                    times.append(time.perf_counter() - t)
            step = statistics.median(times)
            tokens = packed_tokens if method.startswith("packed") else plain_tokens
            mult = (6 if full else 4) + (2 if method.startswith("trl") else 0)
            mfu = mult * n_lm * tokens / step / 1e12 / peak
            rate = bs / step
            rows.append(
                [
                    f"{args.shape} {'LoRA' if args.lora else 'full'}",
                    bs,
                    method,
                    f"{rate:.2f}",
                    f"{torch.cuda.max_memory_allocated() / 2**30:.1f}",
                    f"{int(tokens)}",
                    f"{100 * mfu:.0f}%",
                    f"{100 * mfu * peak / burst:.0f}%",
                    f"{1000 * step:.0f}",
                ]
            )
        # TRL as it runs by default if timed, else TRL with our attention backends
        trl_rows = [r for name in ("trl", "trl-nocudnn") for r in rows if r[1] == bs and r[2] == name]
        trl_rate = float(trl_rows[0][3]) if trl_rows else None
        for r in rows:
            if r[1] == bs and trl_rate:
                r.append(f"{float(r[3]) / trl_rate:.2f}x")
    print_table(
        f"DPO training step, {torch.cuda.get_device_name()}, bf16 matmul peak {peak:.0f} TFLOP/s sustained "
        f"({burst:.0f} in a burst), gradient checkpointing, AdamW",
        [
            "model",
            "batch",
            "method",
            "pairs/s",
            "peak GiB",
            "LM tokens/step",
            "MFU",
            "MFU (burst)",
            "ms/step",
            "vs TRL",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
