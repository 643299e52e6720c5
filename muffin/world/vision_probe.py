"""How well the world's vision tower reads the val cells after N pre-training steps (a fresh tower per count).

    python -m muffin.world.vision_probe --world runs/world --steps 400 1600 4000

Its own module: it builds the bootstrap's model (``muffin.world.bootstrap``), which imports ``muffin.world.vision``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from muffin.world.bootstrap import BootstrapConfig, load_images, world_corpus
from muffin.world.scenes import load_scenes
from muffin.world.vision import cell_data, pretrain_vision


def probe(
    world_dir: str, steps: Sequence[int], cfg: BootstrapConfig | None = None, device: str | None = "cpu"
) -> list[dict]:
    """For each step count, a fresh tower (the bootstrap's model, ``cfg``: a ``BootstrapConfig``) pre-trained on the
    world's SFT scenes and read on its val scenes (``cell_accuracy``): how many objects it misreads."""
    from llava.family import LlavaFamily
    from llava.tiny import build_tiny_llava_hf, tiny_llava_tokenizer

    cfg = cfg or BootstrapConfig()
    world = Path(world_dir)
    tokenizer = tiny_llava_tokenizer(world_corpus(world), vocab_size=cfg.vocab_size)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_llava_hf(tmp, seed=cfg.seed, tokenizer=tokenizer, **cfg.model_sizes())  # each probe reloads it
        processor = LlavaFamily.from_pretrained(tmp, device=device).image_processor
        data = {}
        for split in ("sft", "val"):
            scenes = load_scenes(world, split)
            images = load_images(world, [f"{split}/images/{s.file_name}" for s in scenes])
            data[split] = cell_data(scenes, list(images.values()), processor)
        for n in steps:
            family = LlavaFamily.from_pretrained(tmp, device=device)
            torch.manual_seed(cfg.seed)
            started = time.time()
            _, acc = pretrain_vision(
                family, data["sft"], steps=n, lr=cfg.vision_lr, seed=cfg.seed, progress=False, eval_cells=data["val"]
            )
            rows.append({"steps": n, **acc, "seconds": round(time.time() - started, 1)})
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="How well the world's vision tower reads the val cells after N steps.")
    p.add_argument("--world", required=True, help="world directory (python -m muffin.world.build)")
    p.add_argument("--steps", type=int, nargs="+", default=[400, 1600, 4000], help="pre-training step counts")
    p.add_argument("--vision-hidden", type=int, default=BootstrapConfig.vision_hidden)
    p.add_argument("--vision-layers", type=int, default=BootstrapConfig.vision_layers)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    a = p.parse_args(argv)
    cfg = BootstrapConfig(vision_hidden=a.vision_hidden, vision_layers=a.vision_layers)
    rows = probe(a.world, a.steps, cfg, device=a.device)
    print("| steps | class, occupied val cells % | colour % | all val cells % | class, occupied train % | seconds |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['steps']} | {100 * r['eval_class']:.1f} | {100 * r['eval_colour']:.1f} | {100 * r['eval_cells']:.1f} "
            f"| {100 * r['train_class']:.1f} | {r['seconds']} |"
        )


if __name__ == "__main__":
    main()
