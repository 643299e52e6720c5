"""TRL's stock ``DPOTrainer.train()`` on a pipeline parquet, as a TRL user runs it: the baseline of issue 33.

    python -m script.gpu.trl_dpo --model_path runs/gpu33/ckpt --data runs/gpu33/data/dataset.parquet \
        --output_dir runs/gpu33/trl --steps 12 --batch_size 8 --stats runs/gpu33/trl_stats.json

The checkpoint loads with ``LlavaForConditionalGeneration.from_pretrained`` in bf16; LoRA r64 / alpha 16 / dropout
0.05 on the language model's linear layers and the projector trained in full (peft ``modules_to_save``), the
reference through the disabled adapter (TRL's default with a peft config), bf16, gradient checkpointing
(non-reentrant), batch 8, max length 2048, the LLaVA 1.5 prompt as ``llava.template`` renders it. The stats file gets
the time at each optimizer step's end (CUDA synchronised), the peak memory, the LM tokens of each batch, the LM
matmul parameter count and the measured bf16 matmul rate (``script.bench.common.matmul_peak_tflops``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model_path", required=True)
    p.add_argument("--data", required=True, help="the pipeline's dataset.parquet")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--stats", required=True, help="JSON file for step times, memory and token counts")
    return p


def trl_dataset(path: str, tokenizer, steps: int, batch_size: int):
    """The parquet's pairs in TRL's prompt / chosen / rejected + images layout, repeated to fill ``steps`` batches."""
    import datasets

    from llava.template import render_answer, render_prompt

    ds = datasets.load_dataset("parquet", data_files=[path], split="train")

    def to_trl(rec):
        return {
            "images": [rec["image"]],
            "prompt": tokenizer.bos_token + render_prompt(rec["question"]),
            "chosen": render_answer(rec["chosen"]),
            "rejected": render_answer(rec["rejected"]),
        }

    ds = ds.map(to_trl, remove_columns=ds.column_names)
    repeats = -(-steps * batch_size // len(ds))
    return datasets.concatenate_datasets([ds] * repeats) if repeats > 1 else ds


def main() -> None:
    args = make_parser().parse_args()
    import trl
    from peft import LoraConfig
    from transformers import (
        AutoImageProcessor,
        AutoTokenizer,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        TrainerCallback,
    )

    from script.bench.bench_dpo import lm_matmul_params
    from script.bench.common import matmul_peak_tflops

    cuda = torch.cuda.is_available()  # the CPU path is the smoke run of this script (float32)
    peak = matmul_peak_tflops() if cuda else None
    tok = AutoTokenizer.from_pretrained(args.model_path)
    processor = LlavaProcessor(
        image_processor=AutoImageProcessor.from_pretrained(args.model_path),
        tokenizer=tok,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    model = LlavaForConditionalGeneration.from_pretrained(args.model_path, dtype=torch.bfloat16 if cuda else None)
    n_lm = lm_matmul_params(model)
    lora = LoraConfig(
        r=64,
        lora_alpha=16,
        lora_dropout=0.05,
        target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
        modules_to_save=["multi_modal_projector"],
        task_type="CAUSAL_LM",
    )
    config = trl.DPOConfig(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=1e-5,
        beta=0.1,
        bf16=cuda,
        use_cpu=not cuda,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        max_length=2048,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
    )
    stats: dict = {"step_end": [], "lm_tokens": [], "prompt_tokens": [], "n_lm_params": n_lm, "peak_tflops": peak}

    class StepTimes(TrainerCallback):
        def on_step_end(self, _args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            stats["step_end"].append(time.perf_counter())

    trainer = trl.DPOTrainer(
        model=model,
        args=config,
        processing_class=processor,
        train_dataset=trl_dataset(args.data, tok, args.steps, args.batch_size),
        peft_config=lora,
        callbacks=[StepTimes()],
    )
    collate = trainer.data_collator

    def counting_collator(examples):
        batch = collate(examples)
        tokens = int(batch["attention_mask"].sum())
        stats["lm_tokens"].append(tokens)
        stats["prompt_tokens"].append(tokens - int(batch["completion_mask"].sum()))
        return batch

    trainer.data_collator = counting_collator
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = trainer.train()
    stats.update(
        train_seconds=time.perf_counter() - started,
        started=started,
        metrics=result.metrics,
        max_memory_allocated_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        max_memory_reserved_gib=torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
        trl_version=trl.__version__,
        device=torch.cuda.get_device_name() if cuda else "cpu",
        batch_size=args.batch_size,
        pairs=len(trainer.train_dataset),
    )
    Path(args.stats).write_text(json.dumps(stats, indent=1))
    print(json.dumps({k: v for k, v in stats.items() if k not in ("step_end", "lm_tokens", "prompt_tokens")}))


if __name__ == "__main__":
    main()
