"""DPO training entry point (full fine-tuning or LoRA) for any model family, with cached reference log-probs.

    python -m muffin.train.train_dpo --model_path ckpt/llava-1.5-7b --data data/RLAIF-V-Dataset --output_dir runs/x
    torchrun --nproc_per_node 8 -m muffin.train.train_dpo --deepspeed script/zero2.json --bf16 True ...
    deepspeed --num_gpus 8 muffin/train/train_dpo.py ... | accelerate launch -m muffin.train.train_dpo ...

Every ``DPOConfig`` / ``TrainingArguments`` field is a flag (``--help`` lists them). The reference log-probs are
computed first with the initial model when ``--logps_dir`` (default ``<data>.logps``) holds none, reused when
its fingerprint matches, refused otherwise. A run whose ``--output_dir`` holds ``checkpoint-*`` folders resumes
from the last one.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import asdict

from transformers import HfArgumentParser, set_seed
from transformers.trainer_utils import get_last_checkpoint

from muffin.family import load_family, resolve_dtype
from muffin.train.args import DPOConfig
from muffin.train.data import PreferenceDataset
from muffin.train.reference import default_logps_dir, ensure_reference_logps
from muffin.train.trainer import DPOTrainer, prepare_model
from utils import dist
from utils.io import write_manifest

logger = logging.getLogger(__name__)


def model_dtype(args: DPOConfig) -> str:
    """``auto``: bf16 weights under DeepSpeed with --bf16 (it keeps fp32 master weights), else fp32."""
    if args.model_dtype != "auto":
        return args.model_dtype
    return "bf16" if args.deepspeed and args.bf16 else "fp32"


def _zero3(args: DPOConfig) -> bool:
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    return bool(args.deepspeed) and is_deepspeed_zero3_enabled()


def build_trainer(args: DPOConfig) -> DPOTrainer:
    """Load the family and data, make sure reference log-probs exist, set up full/LoRA training."""
    args.require_paths()
    dataset = PreferenceDataset(args.data, split=args.data_split, image_root=args.image_root)
    logps_dir = args.logps_dir or str(default_logps_dir(dataset))
    if _zero3(args) and not os.path.isfile(os.path.join(logps_dir, "fingerprint.json")):
        raise ValueError(
            f"no reference log-probs in '{logps_dir}' and ZeRO-3 shards the model at load, so they "
            "cannot be computed here. Run first: torchrun --nproc_per_node <gpus> -m "
            f"muffin.train.reference --model_path {args.model_path} --data {args.data} "
            f"--logps_dir {logps_dir} --model_max_length {args.model_max_length}"
        )
    family = load_family(
        args.model_path, family=args.family, dtype=resolve_dtype(model_dtype(args)), device=args.device
    )
    ensure_reference_logps(
        family,
        dataset,
        model_path=args.model_path,
        max_length=args.model_max_length,
        logps_dir=logps_dir,
        batch_size=args.reference_batch_size,
    )
    set_seed(args.seed)  # LoRA's initial weights come from the global RNG: make them a function of --seed
    model = prepare_model(family, args)
    return DPOTrainer(family, args, dataset, model=model)


def resume_point(args: DPOConfig) -> str | None:
    """``--resume_from_checkpoint`` if given, else the last ``checkpoint-*`` in ``--output_dir`` (or None)."""
    if args.resume_from_checkpoint:
        return args.resume_from_checkpoint
    if os.path.isdir(args.output_dir):
        last = get_last_checkpoint(args.output_dir)
        if last:
            logger.info("resuming from %s", last)
        return last
    return None


def train(args: DPOConfig) -> DPOTrainer:
    """Train, then save the final model (same layout as the checkpoints) and a manifest into ``output_dir``."""
    started = time.time()
    trainer = build_trainer(args)
    result = trainer.train(resume_from_checkpoint=resume_point(args))
    trainer.save_model(args.output_dir)
    if dist.is_main():
        write_manifest(
            os.path.join(args.output_dir, "manifest.json"),
            stage="train_dpo",
            config={k: v for k, v in asdict(args).items() if not k.startswith("_")},
            counts={"pairs": len(trainer.train_dataset), "steps": trainer.state.global_step},
            started=started,
            metrics=result.metrics,
        )
    return trainer


def make_parser() -> HfArgumentParser:
    return HfArgumentParser(DPOConfig)


def main(argv: list[str] | None = None) -> None:
    (args,) = make_parser().parse_args_into_dataclasses(args=argv if argv is not None else sys.argv[1:])
    dist.setup_logging()
    train(args)


if __name__ == "__main__":
    main()
