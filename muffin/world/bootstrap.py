"""Bootstrap the world's base policy: supervised training of a tiny LLaVA 1.5 on the world's SFT corpus.

    python -m muffin.world.bootstrap --world runs/world --out runs/base --steps 1500

The model is transformers' ``LlavaForConditionalGeneration`` with a tiny CLIP vision tower and a tiny Llama, a
tokenizer trained on the world's text (``utils.tokenizer.build_tokenizer``), the llava_v1 template, all weights
trained (the vision tower starts random). It is saved as an ordinary llava-hf checkpoint: ``muffin.load_family``,
the feedback pipeline and the trainer load it like any other. Trained on biased descriptions and true answers to
questions (``captions.py``), it hallucinates the usual partners of objects and serves as the loop's base policy
and (self-feedback) labeler. The loss weighs each answer equally (``sft_loss(per_sample=True)``, the default):
with token averaging the one-token yes/no answers get ~5% of the gradient. The yes/no read-out stays weak: with the
defaults, on 600 existence questions of 150 val scenes, accuracy 52.5% (AUC 0.52); before the question-form fix of
``questions._negative`` and the projector alignment, 75.9% balanced on 399 claim questions of 50 val scenes.
Fine-tuning on yes/no questions alone lifts it slowly (CHANGELOG.md, known gaps).
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers.hf_argparser import string_to_bool

from muffin.family import Sample
from muffin.fast.logps import reduce_logps, token_logps
from muffin.world.scenes import load_scenes
from muffin.world.vision import align_projector, cell_data, pretrain_vision
from utils.cuda import resolve_device
from utils.images import load_image
from utils.io import atomic_write_json, read_jsonl, write_manifest

logger = logging.getLogger(__name__)


@dataclass
class BootstrapConfig:
    """Model sizes and training settings. Defaults: 995k parameters; measured on the shared 2-core machine, the
    vision stage takes ~5 s and 1500 supervised steps of batch 32 ~200 s."""

    # 48 / 16: one image token per cell of the world's 3 x 3 grid (9 tokens; the world's 64 px images are resized)
    image_size: int = 48
    patch_size: int = 16
    vision_hidden: int = 64
    vision_layers: int = 2
    text_hidden: int = 128
    text_layers: int = 3
    heads: int = 4
    max_positions: int = 256
    vocab_size: int = 700
    steps: int = 1500
    batch_size: int = 32
    lr: float = 5e-4  # NOTES.md: 5e-4 learns to caption in ~300 steps; 2e-3 stays on the text prior
    warmup_steps: int = 50
    # vision-tower pre-training on the scenes' cells (vision.py); 0 skips it. On the CPU world the tower reads the
    # class of 93.3 % of the occupied val cells after 400 steps, 98.7 % after 1600, 99.6 % after 4000 (33 s on 2
    # cores): misread shapes are hallucinations no feedback can remove (README, "A better-trained vision tower")
    vision_steps: int = 4000
    vision_lr: float = 1e-3
    align_steps: int = 300  # projector alignment of image tokens to their class / colour words (vision.py); 0 skips
    align_places: bool = False  # vision tower also learns each token's cell; projector aligns it to its place words
    freeze_vision: bool = True  # keep the pre-trained tower fixed in the supervised stage (as LLaVA keeps CLIP)
    weight_decay: float = 0.0
    per_sample_loss: bool = True  # average each answer's tokens first (sft_loss): yes/no answers are one token
    seed: int = 0
    log_every: int = 50

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps} and {self.batch_size}")
        if not 0 < self.lr < 1:
            raise ValueError(f"lr must be in (0, 1), got {self.lr}")

    def model_sizes(self) -> dict[str, int]:
        keys = (
            "image_size",
            "patch_size",
            "vision_hidden",
            "vision_layers",
            "text_hidden",
            "text_layers",
            "heads",
            "max_positions",
        )
        return {k: getattr(self, k) for k in keys}


def world_corpus(world_dir: str | Path) -> list[str]:
    """The texts the world's tokenizer is trained on: every SFT question and answer, and the prompt files."""
    world = Path(world_dir)
    texts = [f"{r['question']} {r['answer']}" for r in read_jsonl(world / "sft" / "sft.jsonl")]
    for prompts in sorted(world.glob("*/prompts.jsonl")):
        texts.extend(r["question"] for r in read_jsonl(prompts))
    return texts


def sft_loss(family: Any, samples: Sequence[Sample], *, per_sample: bool = False) -> torch.Tensor:
    """Mean negative log-likelihood of the answer tokens (and end-of-turn) of a batch.

    Token-averaged by default (LLaVA's SFT). ``per_sample`` averages within each answer first, then over the batch,
    so a one-word "Yes"/"No" weighs as much as a 30-token description: token averaging gives the yes/no answers
    ~5% of the gradient and the model answers them from the question's phrasing instead of the image.
    """
    batch = family.encode(samples)
    logits = family.forward(batch)  # (B, T, V)
    logps, mask = token_logps(logits, batch["input_ids"].to(logits.device), batch["answer_mask"].to(logits.device))
    total, mean = reduce_logps(logps, mask)  # (B,), (B,)
    if per_sample:
        return -mean.mean()
    return -total.sum() / mask.sum().clamp(min=1)


def lr_at(step: int, cfg: BootstrapConfig) -> float:
    """Linear warm-up then cosine decay to 10% of ``cfg.lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def sft_train(
    family: Any,
    records: Sequence[dict[str, Any]],
    images: dict[str, Image.Image],
    cfg: BootstrapConfig,
    *,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> list[float]:
    """Train every weight of ``family.model`` on ``records`` (question/answer/image) for ``cfg.steps`` steps.

    Batches are drawn with replacement from a seeded generator, so a run is repeatable. ``on_step(step)`` is called
    after each optimiser step (the model is in train mode; a callback that evaluates must switch modes itself).
    Returns the loss per step.
    """
    model = family.model
    model.train()
    frozen = tuple(p + "." for p in family.frozen_modules()) if cfg.freeze_vision else ()
    params = [p for n, p in model.named_parameters() if not n.startswith(frozen)]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    losses: list[float] = []
    bar = tqdm(range(cfg.steps), desc="sft", disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        idx = torch.randint(len(records), (cfg.batch_size,), generator=gen).tolist()
        samples = [Sample(images[records[i]["image_path"]], records[i]["question"], records[i]["answer"]) for i in idx]
        loss = sft_loss(family, samples, per_sample=cfg.per_sample_loss)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            bar.set_postfix(loss=f"{sum(losses[-cfg.log_every :]) / len(losses[-cfg.log_every :]):.3f}")
            logger.debug("sft step %d loss %.4f", step, losses[-1])
        if on_step is not None:
            on_step(step + 1)
    model.eval()
    return losses


def load_images(world_dir: str | Path, paths: Sequence[str]) -> dict[str, Image.Image]:
    """Decode each distinct image once (the world is small enough to hold in memory)."""
    world = Path(world_dir)
    return {p: load_image(world / p, what=f"world image '{p}'") for p in dict.fromkeys(paths)}


def bootstrap(
    world_dir: str | Path,
    out_dir: str | Path,
    cfg: BootstrapConfig | None = None,
    *,
    progress: bool = True,
    device: str | None = "auto",
) -> Path:
    """Build the tokenizer and a random tiny LLaVA, train it on ``<world>/sft/sft.jsonl``, save it at ``out_dir``.

    ``device``: where to train (float32 everywhere; ``auto``: the GPU when there is one). A CPU run repeats for a
    given seed and thread count; a GPU run is not bit-identical to it.

    Writes the checkpoint, ``bootstrap_log.json`` (loss per step) and ``manifest.json`` next to the weights.
    """
    from llava.family import LlavaFamily
    from llava.tiny import build_tiny_llava_hf, tiny_llava_tokenizer

    started = time.time()
    cfg = cfg or BootstrapConfig()
    world, out = Path(world_dir), Path(out_dir)
    sft_path = world / "sft" / "sft.jsonl"
    if not sft_path.is_file():
        raise FileNotFoundError(
            f"{sft_path} does not exist; build the world first: python -m muffin.world.build --out {world}"
        )
    records = read_jsonl(sft_path)
    tokenizer = tiny_llava_tokenizer(world_corpus(world), vocab_size=cfg.vocab_size)
    build_tiny_llava_hf(out, seed=cfg.seed, tokenizer=tokenizer, **cfg.model_sizes())
    device = resolve_device(device)
    family = LlavaFamily.from_pretrained(out, device=device)
    n_params = sum(p.numel() for p in family.model.parameters())
    logger.info("bootstrap: %d parameters, vocabulary %d, %d SFT records", n_params, len(tokenizer), len(records))
    torch.manual_seed(cfg.seed)
    images = load_images(world, [r["image_path"] for r in records])
    vision_losses: list[float] = []
    vision_accuracy: dict[str, float] = {}
    align_losses: list[float] = []
    if cfg.vision_steps or cfg.align_steps:
        scenes = load_scenes(world, "sft")
        cells = cell_data(scenes, [images[f"sft/images/{s.file_name}"] for s in scenes], family.image_processor)
        stage = dict(lr=cfg.vision_lr, seed=cfg.seed, places=cfg.align_places, progress=progress)
        if cfg.vision_steps:
            val = load_scenes(world, "val")  # held out: how many objects the tower misreads
            val_images = load_images(world, [f"val/images/{s.file_name}" for s in val]).values()
            eval_cells = cell_data(val, list(val_images), family.image_processor) if val else None
            vision_losses, vision_accuracy = pretrain_vision(
                family, cells, steps=cfg.vision_steps, eval_cells=eval_cells, **stage
            )
        if cfg.align_steps:
            align_losses = align_projector(family, cells, steps=cfg.align_steps, **stage)
    losses = sft_train(family, records, images, cfg, progress=progress)
    family.save_pretrained(out)
    atomic_write_json(
        out / "bootstrap_log.json",
        {
            "vision_loss": [round(x, 5) for x in vision_losses],
            "vision_accuracy": vision_accuracy,
            "align_loss": [round(x, 5) for x in align_losses],
            "loss": [round(x, 5) for x in losses],
        },
    )
    write_manifest(
        out / "manifest.json",
        stage="world_bootstrap",
        config=asdict(cfg),
        counts={
            "parameters": n_params,
            "records": len(records),
            "vocab": len(tokenizer),
            "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 5),
        },
        started=started,
        world=str(world),
        device=device,
        vision_accuracy=vision_accuracy,
    )
    logger.info("bootstrap: saved %s (final loss %.4f, %.0f s)", out, losses[-1], time.time() - started)
    return out


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Supervised bootstrap of the world's tiny LLaVA base policy.")
    p.add_argument("--world", required=True, help="world directory (python -m muffin.world.build)")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    d = BootstrapConfig()
    for name in (
        "steps",
        "batch_size",
        "lr",
        "seed",
        "vision_steps",
        "align_steps",
        "image_size",
        "patch_size",
        "vision_hidden",
        "vision_layers",
        "text_hidden",
        "text_layers",
        "vocab_size",
    ):
        p.add_argument(f"--{name.replace('_', '-')}", type=type(getattr(d, name)), default=getattr(d, name))
    p.add_argument(
        "--align-places",
        type=string_to_bool,
        default=d.align_places,
        help="true: the projector alignment also maps each image token near its cell's place words",
    )
    p.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu or cuda[:i]")
    p.add_argument(
        "--token-loss",
        dest="per_sample_loss",
        action="store_false",
        help="average the loss over all answer tokens of a batch (LLaVA's SFT) instead of per answer",
    )
    return p


def main(argv: Sequence[str] | None = None) -> None:
    from utils.dist import setup_logging

    setup_logging()
    a = vars(make_parser().parse_args(argv))
    world, out, device = a.pop("world"), a.pop("out"), a.pop("device")
    path = bootstrap(world, out, BootstrapConfig(**a), device=device)
    print(f"base policy saved to {path}")


if __name__ == "__main__":
    main()
