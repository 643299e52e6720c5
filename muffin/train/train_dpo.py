"""DPO training entry point (full fine-tuning or LoRA) for any model family, with cached reference log-probs.

    python -m muffin.train.train_dpo --model_path ckpt/llava-1.5-7b --data data/RLAIF-V-Dataset --output_dir runs/x
    torchrun --nproc_per_node 8 -m muffin.train.train_dpo --deepspeed script/zero2.json --bf16 True ...
    deepspeed --num_gpus 8 muffin/train/train_dpo.py ... | accelerate launch -m muffin.train.train_dpo ...

Every ``DPOConfig`` / ``TrainingArguments`` field is a flag (``--help`` lists them). The reference log-probs are
computed first with the initial model when ``--logps_dir`` (default ``<data>.logps``) holds none, reused when
its fingerprint matches, refused otherwise. A run whose ``--output_dir`` holds ``checkpoint-*`` folders resumes
from the newest complete one (checkpoints are written to a staging folder and renamed: docs/RESUMING.md).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

from transformers import HfArgumentParser, set_seed

from muffin.family import load_family, resolve_dtype
from muffin.fast.compiled_layers import for_planned_calls
from muffin.train.args import DPOConfig
from muffin.train.checkpoints import last_complete_checkpoint, missing_files
from muffin.train.data import PreferenceDataset
from muffin.train.reference import ensure_reference_logps
from muffin.train.reference_cache import default_logps_dir
from muffin.train.trainer import DPOTrainer, prepare_model
from utils import dist
from utils.fingerprint import StaleOutputError, code_digest, differences, weights_digest
from utils.io import atomic_write_json, write_manifest

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
        args.model_path,
        family=args.family,
        dtype=resolve_dtype(model_dtype(args)),
        device=args.device,
        trust_remote_code=args.trust_remote_code,
    )
    ensure_reference_logps(
        family,
        dataset,
        model_path=args.model_path,
        max_length=args.model_max_length,
        logps_dir=logps_dir,
        batch_size=args.reference_batch_size,
        compile_layers=args.compile_layers,
    )
    family.fast.compile_layers = for_planned_calls(args.compile_layers, planned_forward_calls(args, len(dataset)))
    set_seed(args.seed)  # LoRA's initial weights come from the global RNG: make them a function of --seed
    model = prepare_model(family, args)
    return DPOTrainer(family, args, dataset, model=model)


def planned_forward_calls(args: DPOConfig, num_pairs: int) -> int:
    """Packed batches one rank runs over the whole run: ``max_steps`` x accumulation, else the epochs' batches."""
    if args.max_steps and args.max_steps > 0:
        return args.max_steps * args.gradient_accumulation_steps
    per_epoch = math.ceil(num_pairs / (args.per_device_train_batch_size * max(1, args.world_size)))
    return math.ceil(args.num_train_epochs * per_epoch)


def resume_point(args: DPOConfig) -> str | None:
    """``--resume_from_checkpoint`` if given (refused when incomplete), else the newest complete ``checkpoint-*``
    in ``--output_dir``: an incomplete newer one (cut short by a crash) is skipped with a warning."""
    needs_optimizer = not args.save_only_model
    if args.resume_from_checkpoint:
        missing = missing_files(args.resume_from_checkpoint, needs_optimizer=needs_optimizer)
        if missing:
            raise ValueError(
                f"--resume_from_checkpoint {args.resume_from_checkpoint} is incomplete (missing: "
                f"{', '.join(missing)}); pass an older checkpoint, or drop the flag to take the newest complete one"
            )
        return args.resume_from_checkpoint
    last = last_complete_checkpoint(args.output_dir, needs_optimizer=needs_optimizer)
    if last is not None:
        logger.info("resuming from %s", last)
    return None if last is None else str(last)


def save_final(trainer: DPOTrainer, output_dir: str) -> None:
    """The final model into ``output_dir`` through a staging folder, each file renamed into place (the manifest,
    written after, marks a finished run)."""
    staging = os.path.join(output_dir, ".tmp-final")
    if trainer.args.should_save and os.path.isdir(staging):
        shutil.rmtree(staging)
    trainer.save_model(staging)
    trainer.accelerator.wait_for_everyone()
    if trainer.args.should_save:
        for name in sorted(os.listdir(staging)):
            target = os.path.join(output_dir, name)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            os.replace(os.path.join(staging, name), target)
        shutil.rmtree(staging, ignore_errors=True)


# settings that change the training trajectory: a resumed run must use the ones its checkpoints were made with
# (max_steps / num_train_epochs are left out: extending a finished run is a legitimate resume)
TRAJECTORY_ARGS = (
    "family",
    "model_dtype",
    "freeze_vision",
    "model_max_length",
    "beta",
    "loss_type",
    "label_smoothing",
    "use_average",
    "sft_weight",
    "ddpo_gamma",
    "use_lora",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_ratio",
    "warmup_steps",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "optim",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "seed",
    "data_seed",
    "bf16",
    "fp16",
)
FINGERPRINT = "fingerprint.json"


def training_fingerprint(args: DPOConfig, logps_dir: str | os.PathLike) -> dict:
    """What the checkpoints of ``output_dir`` are made from: the initial model (sampled weights digest, LoRA, dtype)
    and the data as the reference cache fingerprinted them (pair files and their images), the trajectory settings,
    and the code (compared with a warning only: a fix during a week-long run should not cost the run)."""
    from muffin.train import loss, trainer

    ref = json.loads((Path(logps_dir) / "fingerprint.json").read_text())
    return {
        "model": {"name": Path(args.model_path).name, "weights": weights_digest(args.model_path)},
        "data": {"source": Path(str(args.data)).name, **ref["data"]},
        "settings": {k: getattr(args, k, None) for k in TRAJECTORY_ARGS},
        "code": code_digest(trainer, loss, PreferenceDataset),
    }


def check_output_dir(args: DPOConfig, fingerprint: dict, resume: str | None) -> None:
    """Refuse to resume checkpoints made with another model, data or setting (naming each); warn on other code;
    record the fingerprint."""
    path = Path(args.output_dir) / FINGERPRINT
    if resume is not None and path.is_file():
        found = json.loads(path.read_text())
        diff = differences(
            {k: v for k, v in found.items() if k != "code"}, {k: v for k, v in fingerprint.items() if k != "code"}
        )
        if diff:
            raise StaleOutputError(
                f"{args.output_dir} holds checkpoints of a run made with another model, data or setting:\n  "
                + "\n  ".join(diff)
                + "\nResuming would mix two runs. Pass --overwrite True to start over (deletes its checkpoint-* "
                "folders), use another --output_dir, or rerun with the settings above (after each arrow: this run's)."
            )
        code = differences(found.get("code"), fingerprint["code"], "code")
        if code:
            logger.warning("resuming with other code than the checkpoints were made with: %s", "; ".join(code))
    if dist.is_main():
        atomic_write_json(path, fingerprint)


def start_over(output_dir: str) -> None:
    """``--overwrite``: remove the checkpoints (and staging folders) and the fingerprint of ``output_dir``."""
    root = Path(output_dir)
    if not dist.is_main() or not root.is_dir():
        return
    for p in root.iterdir():
        if p.is_dir() and re.fullmatch(r"(?:\.tmp-|\.replaced-)?checkpoint-\d+|\.tmp-final", p.name):
            shutil.rmtree(p)
            logger.info("--overwrite: removed %s", p)
    (root / FINGERPRINT).unlink(missing_ok=True)


def train(args: DPOConfig) -> DPOTrainer:
    """Train, then save the final model (same layout as the checkpoints) and a manifest into ``output_dir``."""
    started = time.time()
    trainer = build_trainer(args)
    if args.overwrite:
        start_over(args.output_dir)
        trainer.accelerator.wait_for_everyone()
    resume = None if args.overwrite else resume_point(args)
    fingerprint = training_fingerprint(args, args.logps_dir or default_logps_dir(trainer.train_dataset))
    check_output_dir(args, fingerprint, resume)
    result = trainer.train(resume_from_checkpoint=resume)
    save_final(trainer, args.output_dir)
    if dist.is_main():
        write_manifest(
            os.path.join(args.output_dir, "manifest.json"),
            stage="train_dpo",
            config={k: v for k, v in asdict(args).items() if not k.startswith("_")},
            counts={"pairs": len(trainer.train_dataset), "steps": trainer.state.global_step},
            started=started,
            metrics=result.metrics,
            fingerprint=fingerprint,
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
