"""A labeler that does not know the world: a fresh tiny LLaVA trained on another world's scenes, generic questions.

    python -m muffin.world.generic_labeler --out runs/labeler_generic [--work runs/labeler_generic_world --seed 1000]

RLAIF-V's labeler is a general open model. ``muffin.world.labeler`` (the ``world-trained`` labeler) is not: it
fine-tunes the base policy on the feedback world's own scenes with negatives built from its planted sources, so its
feedback is close to the oracle by construction. This one draws a separate world (its own seed, no co-occurrence:
``p_partner`` 0; ``sft`` and ``val`` splits only), describes it truthfully (``captions.describe(faithful=True)``)
and asks yes/no questions whose false answers are uniform (any absent class, any other colour, another count, any
other cell): a planted source (the absent usual partner, the confusable colour, one too many, the mirror cell) comes
up only at its chance rate. It bootstraps a fresh model on that (``bootstrap.bootstrap``: tower, alignment,
supervised steps), then runs the labeler's two phases (plain existence, then the loop's claim questions about
perturbed copies of the scenes) and keeps the candidate with the best AUC on claim questions about its own ``val``
scenes. It never sees the feedback world's images, ground truth, descriptions or base policy; only the vocabulary
(classes, colours, places, the description and question templates) is shared, as a general VLM knows the words.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from muffin.world.bootstrap import BootstrapConfig, bootstrap, load_images, sft_train
from muffin.world.captions import CaptionConfig, describe
from muffin.world.labeler import SELECT_METRICS, claim_records, easy_records, keep_best, readout_quality
from muffin.world.oracle import claim_kind, names_absent_object
from muffin.world.questions import (
    DESCRIBE_PROMPTS,
    colour_qa,
    count_of,
    count_qa,
    existence_question,
    name_of,
    oracle_claim,
)
from muffin.world.scenes import Scene, WorldConfig, load_scenes, write_world
from muffin.world.shapes import CELL_NAMES, CLASSES, COLOURS, PARTNER
from utils.cuda import resolve_device
from utils.io import atomic_write_json, atomic_write_text, write_manifest

logger = logging.getLogger(__name__)

# The generic world's descriptions: no annotator habit at all (``describe(faithful=True)`` draws none), the
# world's default synonym and place-sentence rates (vocabulary, not bias).
GENERIC_CAPTIONS = CaptionConfig(hallucination_rate=0.0)


@dataclass
class GenericLabelerConfig:
    """The generic world, the fresh model's supervised stage and the labeler's two phases."""

    seed: int = 1000  # the generic world's seed (and the training seed): keep it off every feedback world's seed
    n_sft: int = 4000
    n_val: int = 300
    min_objects: int = 1
    max_objects: int = 5
    questions_per_scene: int = 4  # generic yes/no questions per scene in the supervised stage
    bootstrap_steps: int = 4000
    easy_steps: int = 1500
    steps: int = 1000
    batch_size: int = 32
    lr: float = 2e-4  # the labeler phases' (muffin.world.labeler's default); the supervised stage keeps its own
    labeler_questions_per_scene: int = 8  # per labeler phase
    perturb_rate: float = 0.5
    eval_scenes: int = 300  # generic val scenes whose claim questions select the candidate
    select: str = "auc"

    def __post_init__(self) -> None:
        if self.select not in SELECT_METRICS:
            raise ValueError(
                f"GenericLabelerConfig.select must be one of {', '.join(SELECT_METRICS)}, got '{self.select}'"
            )
        for name in ("n_sft", "n_val", "bootstrap_steps", "questions_per_scene", "eval_scenes"):
            if getattr(self, name) < 1:
                raise ValueError(f"GenericLabelerConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("easy_steps", "steps", "labeler_questions_per_scene"):
            if getattr(self, name) < 0:
                raise ValueError(f"GenericLabelerConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.perturb_rate <= 1:
            raise ValueError(f"GenericLabelerConfig.perturb_rate must be in [0, 1], got {self.perturb_rate}")


# ----------------------------------------------------------------------------------------------- generic data
def generic_question(scene: Scene, rng: random.Random, *, synonym_rate: float = 0.0) -> tuple[str, bool]:
    """A yes/no question about ``scene`` (plain, colour, count or place), true or false with probability 1/2.

    A false one changes what it asks uniformly: any absent class, any colour the class lacks here, any other count
    of 2-4, any cell without that object. The truth is read from the scene (``oracle_claim``), so a change that
    happens to hold is a "Yes".
    """
    obj = rng.choice(scene.objects)
    variant = rng.choice(["plain", "colour", "colour", "count", "place"])
    cls, colour, count, where = obj.cls, obj.colour, 1, None
    if variant == "plain":
        colour = None
    elif variant == "count":
        count = count_of(scene, cls, colour)
    elif variant == "place":
        where = CELL_NAMES[obj.cell]
    if rng.random() >= 0.5:  # a false question
        absent = [c for c in CLASSES if c not in scene.classes()]
        if variant == "plain" or (variant == "colour" and rng.random() < 0.5):
            cls = rng.choice(absent)
            colour = rng.choice(list(COLOURS)) if colour else None
        elif variant == "colour":
            colour = rng.choice([c for c in COLOURS if count_of(scene, cls, c) == 0])
        elif variant == "count":
            count = rng.choice([c for c in (2, 3, 4) if c != count])
        else:
            where = rng.choice([n for i, n in enumerate(CELL_NAMES) if count_of(scene, cls, colour, i) == 0])
    truth = oracle_claim(scene, count, colour, cls, where)
    return existence_question(count, colour, name_of(cls, rng, synonym_rate), where, rng), truth


def generic_sft_records(
    scene: Scene, image: str, rng: random.Random, *, questions: int = 4, captions: CaptionConfig = GENERIC_CAPTIONS
) -> list[dict[str, Any]]:
    """The fresh model's supervised examples for one generic scene: a faithful description, ``questions`` generic
    yes/no questions (``generic_question``), a colour and a counting question (true answers)."""
    recs: list[dict[str, Any]] = []

    def add(question: str, answer: str, kind: str) -> None:
        recs.append(
            {"image_path": image, "image_id": scene.image_id, "question": question, "answer": answer, "kind": kind}
        )

    text, _ = describe(scene, rng, captions, faithful=True)
    add(rng.choice(DESCRIBE_PROMPTS), text, "describe")
    for _ in range(questions):
        q, truth = generic_question(scene, rng, synonym_rate=captions.synonym_rate)
        add(q, "Yes" if truth else "No", "exist")
    for qa in (
        colour_qa(scene, rng, synonym_rate=captions.synonym_rate),
        count_qa(scene, rng, synonym_rate=captions.synonym_rate),
    ):
        if qa is not None:
            add(qa.question, qa.answer, qa.kind)
    return recs


def image_path(scene: Scene) -> str:
    return f"{scene.split}/images/{scene.file_name}"


def build_generic_world(work: str | Path, cfg: GenericLabelerConfig, *, progress: bool = True) -> bool:
    """Draw the generic world into ``work``: ``sft`` and ``val`` scenes (no co-occurrence), ``sft/sft.jsonl`` (the
    supervised stage's records) and a manifest. Returns False when ``work`` already holds this world (kept)."""
    work = Path(work)
    world_cfg = WorldConfig(seed=cfg.seed, min_objects=cfg.min_objects, max_objects=cfg.max_objects, p_partner=0.0)
    splits = {"sft": cfg.n_sft, "val": cfg.n_val}
    config = {
        "world": asdict(world_cfg),
        "captions": asdict(GENERIC_CAPTIONS),
        "splits": splits,
        "questions_per_scene": cfg.questions_per_scene,
    }
    manifest = work / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("config") == config:
        return False
    started = time.time()
    write_world(work, world_cfg, splits, progress=progress)
    rng = random.Random(f"generic-sft:{cfg.seed}")
    recs = [
        r
        for sc in load_scenes(work, "sft")
        for r in generic_sft_records(sc, image_path(sc), rng, questions=cfg.questions_per_scene)
    ]
    atomic_write_text(work / "sft" / "sft.jsonl", "".join(json.dumps(r) + "\n" for r in recs))
    write_manifest(manifest, stage="generic_world", config=config, counts={"sft_records": len(recs)}, started=started)
    return True


def labeled_claims(
    scenes: Sequence[Scene], rng: random.Random, n: int, rate: float, captions: CaptionConfig = GENERIC_CAPTIONS
) -> list[dict[str, Any]]:
    """``claim_records(generic=True)`` for each scene, each record with its ``kind`` and ``absent`` (names a class
    the scene lacks), as ``labeler.readout_quality`` reads them."""
    out = []
    for sc in scenes:
        for r in claim_records(sc, image_path(sc), rng, n, rate, captions, generic=True):
            truth = r["answer"] == "Yes"
            out.append(
                r | {"kind": claim_kind(r["question"]), "absent": not truth and names_absent_object(sc, r["question"])}
            )
    return out


def partner_negatives(records: Sequence[dict[str, Any]], scenes: dict[str, Scene]) -> dict[str, float]:
    """Among "No" existence questions of ``records`` (image path -> scene in ``scenes``), how many name the absent
    usual partner of a present class (``shapes.PARTNER``, the feedback world's planted source), against the count a
    uniform choice of the named class among the absent ones gives (``chance``). The world-trained labeler's easy
    phase picks the partner half of the time."""
    from muffin.world.questions import parse_mentions

    hits, chance, n = 0, 0.0, 0
    for r in records:
        if r["answer"] != "No" or r["image_path"] not in scenes:
            continue
        sc = scenes[r["image_path"]]
        named = {cls for _, _, cls, _ in parse_mentions(r["question"])} - sc.classes()
        if len(named) != 1:
            continue  # a colour, count or place negative about a present class
        n += 1
        partners = {PARTNER[c] for c in sc.classes()} - sc.classes()
        hits += bool(named & partners)
        chance += len(partners) / (len(CLASSES) - len(sc.classes()))
    return {"absent_class_negatives": n, "partner": hits, "chance": round(chance, 2)}


# ------------------------------------------------------------------------------------------------- training
def train_generic_labeler(
    out_dir: str | Path,
    cfg: GenericLabelerConfig | None = None,
    *,
    work_dir: str | Path | None = None,
    bootstrap_cfg: BootstrapConfig | None = None,
    progress: bool = True,
    device: str | None = "auto",
) -> Path:
    """Draw the generic world into ``work_dir`` (default ``<out_dir>_world``), bootstrap a fresh model on it
    (``<work_dir>/base``), run the labeler's phases and save the best candidate at ``out_dir``.

    Writes the checkpoint, ``labeler_log.json`` (losses, each candidate's metrics on the generic val claims, what
    each phase consumed) and ``manifest.json`` (written last: its presence means the labeler is complete).
    """
    from muffin.family import load_family

    started = time.time()
    cfg = cfg or GenericLabelerConfig()
    out = Path(out_dir)
    work = Path(work_dir) if work_dir is not None else out.with_name(out.name + "_world")
    seconds: dict[str, float] = {}
    redrawn = build_generic_world(work, cfg, progress=progress)
    seconds["world"] = time.time() - started
    base, bcfg = work / "base", bootstrap_cfg or BootstrapConfig(steps=cfg.bootstrap_steps, seed=cfg.seed)
    made = base / "manifest.json"  # the base is reused only when it was bootstrapped on this world with this config
    if redrawn or not made.is_file() or json.loads(made.read_text()).get("config") != asdict(bcfg):
        t = time.time()
        bootstrap(work, base, bcfg, progress=progress, device=device)
        seconds["bootstrap"] = time.time() - t
    t = time.time()
    sft, val = load_scenes(work, "sft"), load_scenes(work, "val")[: cfg.eval_scenes]
    rng = random.Random(f"generic-labeler:{cfg.seed}")
    n = cfg.labeler_questions_per_scene
    easy = [r for sc in sft for r in easy_records(sc, image_path(sc), rng, n, generic=True)]
    claims = [
        r
        for sc in sft
        for r in claim_records(sc, image_path(sc), rng, n, cfg.perturb_rate, GENERIC_CAPTIONS, generic=True)
    ]
    sel_records = labeled_claims(val, random.Random(f"generic-val:{cfg.seed}"), n, cfg.perturb_rate)
    images = load_images(work, [image_path(sc) for sc in sft + val])
    device = resolve_device(device)
    family = load_family(str(base), dtype=torch.float32, device=device)

    def candidate() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return readout_quality(family, sel_records, images), copy.deepcopy(family.model.state_dict())

    candidates = {"base": candidate()}
    losses: dict[str, list[float]] = {}
    torch.manual_seed(cfg.seed)
    for phase, records, steps in (("easy", easy, cfg.easy_steps), ("claims", claims, cfg.steps)):
        if steps:
            phase_cfg = BootstrapConfig(
                steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=20, seed=cfg.seed
            )
            losses[phase] = sft_train(family, records, images, phase_cfg, progress=progress)
            candidates[phase] = candidate()
    selection, selected = keep_best(family, candidates, cfg.select, f"generic labeler ({len(sel_records)} val claims)")
    seconds["labeler"] = time.time() - t
    family.save_pretrained(out)
    by_path = {image_path(sc): sc for sc in sft}
    consumed = {
        "easy": {"questions": len(easy), **partner_negatives(easy, by_path)},
        "claims": {"questions": len(claims), **partner_negatives(claims, by_path)},
    }
    atomic_write_json(
        out / "labeler_log.json",
        {
            "selection": selection,
            "selected": selected,
            "consumed": consumed,
            "loss": {k: [round(x, 5) for x in v] for k, v in losses.items()},
        },
    )
    write_manifest(
        out / "manifest.json",
        stage="world_generic_labeler",
        config=asdict(cfg),
        counts={
            "easy_questions": len(easy),
            "claim_questions": len(claims),
            "scenes": len(sft),
            "val_claims": len(sel_records),
        },
        started=started,
        generic_world=str(work),
        generic_world_seed=cfg.seed,
        selected=selected,
        selection_score={k: m[cfg.select] for k, m in selection.items()},
        val_accuracy=selection[selected]["accuracy"],
        val_balanced_accuracy=selection[selected]["balanced_accuracy"],
        seconds={k: round(v, 1) for k, v in seconds.items()},
        device=device,
    )
    logger.info("generic labeler: saved %s (%.0f s)", out, time.time() - started)
    return out


FLAG_HELP = {
    "seed": "the generic world's seed and the training seed; keep it off every feedback world's seed",
    "n_sft": "generic scenes the model and the labeler phases train on",
    "n_val": "generic scenes held out: the tower's check and the candidates' selection",
    "min_objects": "objects per generic scene, at least",
    "max_objects": "objects per generic scene, at most",
    "questions_per_scene": "generic yes/no questions per scene in the supervised stage (with a description, a colour "
    "and a counting question)",
    "bootstrap_steps": "supervised steps of the fresh model (muffin.world.bootstrap; its tower and alignment stages "
    "keep their defaults)",
    "easy_steps": "labeler phase 1: plain existence questions, uniform absent classes (0 skips it)",
    "steps": "labeler phase 2: the loop's claim questions about perturbed copies of the scenes (0 skips it)",
    "batch_size": "batch of the labeler phases",
    "lr": "learning rate of the labeler phases",
    "labeler_questions_per_scene": "questions per scene in each labeler phase",
    "perturb_rate": "P(an object of a described copy is changed) in phase 2 and the selection set",
    "eval_scenes": "generic val scenes whose claim questions select the candidate",
}


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train a yes/no labeler that does not know the feedback world: a fresh tiny LLaVA on another "
        "world's scenes with generic questions (uniform negatives, no planted source)."
    )
    p.add_argument("--out", required=True, help="where to save the labeler checkpoint")
    p.add_argument(
        "--work", default=None, help="the generic world and its bootstrapped base (default: <out>_world; reused)"
    )
    d = GenericLabelerConfig()
    for f in dataclasses.fields(GenericLabelerConfig):
        if f.name == "select":
            continue
        value = getattr(d, f.name)
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(value), default=value, help=FLAG_HELP[f.name])
    p.add_argument(
        "--select",
        choices=SELECT_METRICS,
        default=d.select,
        help="rank the candidates by the AUC on the generic val claims overall (default), within claim kinds, or on "
        "claims naming absent objects",
    )
    p.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu or cuda[:i]")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    from utils.dist import setup_logging

    setup_logging()
    a = vars(make_parser().parse_args(argv))
    out, work, device = a.pop("out"), a.pop("work"), a.pop("device")
    path = train_generic_labeler(out, GenericLabelerConfig(**a), work_dir=work, device=device)
    print(f"generic labeler saved to {path}")


if __name__ == "__main__":
    main()
