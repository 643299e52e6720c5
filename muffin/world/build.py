"""Build a synthetic world on disk: scenes, COCO ground truth, synonym table, SFT corpus and prompt files.

    python -m muffin.world.build --out runs/world --n-sft 4000 --n-feedback 300 --n-val 100 --n-test 300

Layout (image paths in every JSONL are relative to ``--out``; pass it as ``--image-root`` to the pipeline):

    manifest.json                       configs, counts, the measured caption bias (captions.corpus_stats)
    synonyms.txt                        the world's synonym table (COCO format: ``canonical, synonym, ...``)
    <split>/images/<split>_000000.png   sft / feedback / val / test scenes
    <split>/instances.json              COCO instances (pycocotools, Object HalBench's CHAIR)
    <split>/scenes.jsonl                the scenes' full ground truth (colours, cells, polygons)
    <split>/prompts.jsonl               one description prompt per scene, in the pipeline's input format
    sft/sft.jsonl                       supervised records for the base policy (descriptions + questions)
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from muffin.world.captions import CaptionConfig, corpus_stats, sft_records
from muffin.world.questions import DESCRIBE_PROMPTS
from muffin.world.scenes import Scene, WorldConfig, load_scenes, write_world
from utils.io import atomic_write_text, write_manifest

logger = logging.getLogger(__name__)


def image_path(scene: Scene) -> str:
    """Path of a scene's image relative to the world directory."""
    return f"{scene.split}/images/{scene.file_name}"


def prompt_records(scenes: Sequence[Scene], *, seed: int = 0) -> list[dict[str, Any]]:
    """One detailed-description prompt per scene, in the pipeline's input format (``ds_question_id``, ...).

    The top-level ``image_id`` makes the same file an Object HalBench question file (``eval.answer``).
    """
    out = []
    for sc in scenes:
        rng = random.Random(f"prompt:{seed}:{sc.image_id}")
        out.append(
            {
                "ds_question_id": f"world_{sc.image_id}",
                "image_id": sc.image_id,
                "image_path": image_path(sc),
                "question": rng.choice(DESCRIBE_PROMPTS),
                "metainfos": {"image_id": sc.image_id, "split": sc.split, "origin_dataset": "world"},
            }
        )
    return out


def _jsonl(recs: Sequence[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)


def build_world(
    out_dir: str | Path,
    *,
    world: WorldConfig | None = None,
    captions: CaptionConfig | None = None,
    splits: dict[str, int] | None = None,
    sft_per_scene: dict[str, int] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write a whole world (see the module docstring); returns its manifest.

    Args:
        out_dir: the world directory.
        world: scene sampling (seed, image size, objects per scene, co-occurrence).
        captions: the annotator's habits (the rate of each hallucination source, the synonym rate).
        splits: scenes per split; default sft 4000, feedback 300, val 100, test 300.
        sft_per_scene: records per SFT scene by kind (``n_describe``, ``n_exist``, ``n_colour``, ``n_count``, ``n_where``).
    """
    started = time.time()
    world, captions = world or WorldConfig(), captions or CaptionConfig()
    out = Path(out_dir)
    splits = splits or {"sft": 4000, "feedback": 300, "val": 100, "test": 300}
    sft_per_scene = sft_per_scene or {}
    write_world(out, world, splits, progress=progress)
    counts: dict[str, Any] = {}
    for split, n in splits.items():
        scenes = load_scenes(out, split)
        atomic_write_text(out / split / "prompts.jsonl", _jsonl(prompt_records(scenes, seed=world.seed)))
        counts[split] = {"scenes": n, "objects": sum(len(s.objects) for s in scenes)}
    stats: dict[str, Any] = {}
    if splits.get("sft"):
        rng = random.Random(f"sft:{world.seed}")
        recs = [
            r
            for sc in load_scenes(out, "sft")
            for r in sft_records(sc, image_path(sc), rng, captions, **sft_per_scene)
        ]
        atomic_write_text(out / "sft" / "sft.jsonl", _jsonl(recs))
        stats = corpus_stats(recs)
        counts["sft"]["records"] = len(recs)
        logger.info("SFT corpus: %d records; caption bias measured: %s", len(recs), stats)
    config = {"world": asdict(world), "captions": asdict(captions), "splits": splits, "sft_per_scene": sft_per_scene}
    return write_manifest(
        out / "manifest.json", stage="world", config=config, counts=counts, started=started, caption_bias=stats
    )


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Build the synthetic shape world (images, COCO ground truth, SFT data).")
    p.add_argument("--out", required=True, help="world directory to write")
    p.add_argument("--seed", type=int, default=0, help="world seed: same seed, same images and annotations")
    p.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    p.add_argument("--n-sft", type=int, default=4000, help="scenes for the base policy's supervised data")
    p.add_argument("--n-feedback", type=int, default=300, help="scenes whose prompts feed the alignment loop")
    p.add_argument("--n-val", type=int, default=100, help="scenes for checkpoint selection")
    p.add_argument("--n-test", type=int, default=300, help="held-out scenes for the final evaluation")
    p.add_argument("--min-objects", type=int, default=1)
    p.add_argument("--max-objects", type=int, default=5)
    p.add_argument("--p-partner", type=float, default=0.6, help="co-occurrence: P(add a missing usual partner)")
    p.add_argument(
        "--p-repeat",
        type=float,
        default=WorldConfig.p_repeat,
        help="P(the next object copies one already present): groups of several objects, what counting is about",
    )
    p.add_argument(
        "--hallucination-rate",
        type=float,
        default=CaptionConfig.hallucination_rate,
        help="partner source: P(a training description names the absent usual partner of a present object)",
    )
    p.add_argument(
        "--colour-confusion-rate",
        type=float,
        default=CaptionConfig.colour_confusion_rate,
        help="colour source: P(a described orange / purple group is called red / blue)",
    )
    p.add_argument(
        "--miscount-rate",
        type=float,
        default=CaptionConfig.miscount_rate,
        help="count source: P(a described group of two or more objects is given one object too many)",
    )
    p.add_argument(
        "--place-error-rate",
        type=float,
        default=CaptionConfig.place_error_rate,
        help="position source: P(a place sentence names the mirror cell, left and right swapped)",
    )
    p.add_argument(
        "--synonym-rate",
        type=float,
        default=CaptionConfig.synonym_rate,
        help="P(a description names a class by a synonym)",
    )
    p.add_argument(
        "--max-places",
        type=int,
        default=CaptionConfig.max_places,
        help="at most this many 'There is a <object> <place>.' sentences per training description (0: none)",
    )
    p.add_argument(
        "--n-where",
        type=int,
        default=0,
        help="'Where is the <colour> <object>?' questions per SFT scene (default 0; descriptions teach places too)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> None:
    from utils.dist import setup_logging

    setup_logging()
    a = make_parser().parse_args(argv)
    world = WorldConfig(
        seed=a.seed,
        image_size=a.image_size,
        min_objects=a.min_objects,
        max_objects=a.max_objects,
        p_partner=a.p_partner,
        p_repeat=a.p_repeat,
    )
    captions = CaptionConfig(
        hallucination_rate=a.hallucination_rate,
        synonym_rate=a.synonym_rate,
        max_places=a.max_places,
        colour_confusion_rate=a.colour_confusion_rate,
        miscount_rate=a.miscount_rate,
        place_error_rate=a.place_error_rate,
    )
    splits = {"sft": a.n_sft, "feedback": a.n_feedback, "val": a.n_val, "test": a.n_test}
    manifest = build_world(
        a.out,
        world=world,
        captions=captions,
        splits={k: v for k, v in splits.items() if v},
        sft_per_scene={"n_where": a.n_where} if a.n_where else None,
    )
    print(f"world written to {a.out}: {manifest['counts']}")
    print(f"caption bias (measured): {manifest['caption_bias']}")


if __name__ == "__main__":
    main()
