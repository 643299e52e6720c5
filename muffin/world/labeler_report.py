"""Labelers side by side on what the loop asks them: the base policy's own claims about a world split, per claim kind.

    python -m muffin.world.labeler_report --world W --policy BASE --labeler generic=CKPT \\
        --labeler world-trained=CKPT [--split feedback --scenes 300 --samples 4 --out DIR]

The base policy describes ``--scenes`` scenes of ``--split`` ``--samples`` times (T 0.7, the loop's sampling); the
rule backends split the answers into claims and questions (``labeler.own_claims``), the ground truth answers them,
and each labeler's P(yes) vs P(no) read-out is scored against it: accuracy and AUC overall and per claim kind
(``oracle.claim_kind``), and the share of false claims it rejects by where they come from (``claim_source``). The
``oracle`` row is the ground truth itself, the bound any labeler can reach.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from muffin.world.oracle import CLAIM_KINDS, claim_row, claims_summary, yes_share
from muffin.world.questions import parse_mentions
from muffin.world.scenes import Scene, load_scenes
from muffin.world.shapes import PARTNER

logger = logging.getLogger(__name__)

SOURCES = ("partner", "other_absent", "colour", "count", "place", "object")


def claim_source(scene: Scene, question: str) -> str:
    """Where a FALSE claim's error lies: ``partner`` (it names an absent class that is the usual partner of a present
    one: the feedback world's planted co-occurrence), ``other_absent`` (another absent class), else its claim kind
    (``colour``, ``count``, ``place``: a present class with a wrong attribute; ``object``: anything else)."""
    from muffin.world.oracle import claim_kind

    named = {cls for _, _, cls, _ in parse_mentions(question)} - scene.classes()
    if named:
        return "partner" if named & {PARTNER[c] for c in scene.classes()} else "other_absent"
    return claim_kind(question)


def judge(
    verdicts: Sequence[tuple[float, float]], records: Sequence[dict[str, Any]], scenes: dict[str, Scene]
) -> dict[str, Any]:
    """``claims_summary`` of read-outs ``(p_yes, p_no)`` on ``records`` (``image_path``, ``question``, ``answer``),
    plus ``rejected_by_source``: for each ``claim_source`` of the false claims, how many there are and the share the
    labeler answered "no"."""
    rows, by_source = [], {s: [0, 0] for s in SOURCES}
    for r, (p_yes, p_no) in zip(records, verdicts):
        sc, truth = scenes[r["image_path"]], r["answer"] == "Yes"
        rows.append(claim_row(sc, r["question"], truth, p_yes > p_no, yes_share(p_yes, p_no)))
        if not truth:
            s = by_source[claim_source(sc, r["question"])]
            s[0] += 1
            s[1] += p_yes <= p_no
    out = claims_summary(rows)
    out["rejected_by_source"] = {k: {"false_claims": n, "rejected": r / n} for k, (n, r) in by_source.items() if n}
    return out


def compare_labelers(
    world: str | Path,
    policy: str | Path,
    labelers: dict[str, str | Path],
    *,
    split: str = "feedback",
    scenes: int = 300,
    samples: int = 4,
    seed: int = 0,
    device: str | None = "cpu",
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Each labeler's (and the oracle's) verdicts on the base policy's own claims about the first ``scenes`` scenes
    of ``split``; returns ``{name: judge(...)}`` and the claim records."""
    from muffin.family import Sample, load_family
    from muffin.inference import yes_no_probs
    from muffin.world.labeler import own_claims
    from utils.cuda import resolve_device

    world = Path(world)
    device = resolve_device(device)
    picked = load_scenes(world, split)[:scenes]
    by_path = {f"{split}/images/{s.file_name}": s for s in picked}
    base = load_family(str(policy), dtype=torch.float32, device=device)
    records, images = own_claims(base, world, split, picked, samples_per_scene=samples, seed=seed)
    del base
    logger.info("labeler report: %d claim questions from %d %s scenes", len(records), len(picked), split)
    results = {
        "oracle": judge([(float(r["answer"] == "Yes"), float(r["answer"] == "No")) for r in records], records, by_path)
    }
    for name, path in labelers.items():
        family = load_family(str(path), dtype=torch.float32, device=device)
        probs = yes_no_probs(family, [Sample(images[r["image_path"]], r["question"]) for r in records], batch_size=64)
        results[name] = judge(probs, records, by_path)
    return results, records


def _pct(x: float | None) -> str:
    return "-" if x is None or x != x else f"{100 * x:.1f}"


def report_table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown: per labeler, accuracy (balanced) and AUC overall, accuracy / AUC per claim kind, and the share of
    false claims rejected per source (with their counts in the header)."""
    kinds = [k for k in CLAIM_KINDS if any(k in r["by_kind"] for r in results.values())]
    first = next(iter(results.values()))
    sources = [s for s in SOURCES if s in first["rejected_by_source"]]
    head = ["labeler", "claims", "accuracy % (balanced)", "AUC"]
    head += [f"{k}: acc % / AUC ({first['by_kind'][k]['claims']})" for k in kinds]
    head += [f"false {s} rejected % ({first['rejected_by_source'][s]['false_claims']})" for s in sources]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        cells = [name, str(r["claims"]), f"{_pct(r['accuracy'])} ({_pct(r['balanced_accuracy'])})", _auc(r["auc"])]
        for k in kinds:
            m = r["by_kind"].get(k)
            cells.append(f"{_pct(m['accuracy'])} / {_auc(m['auc'])}" if m else "-")
        cells += [_pct(r["rejected_by_source"].get(s, {}).get("rejected")) for s in sources]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _auc(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Score labelers against the ground truth on the base policy's own claims.")
    p.add_argument("--world", required=True, help="world directory (python -m muffin.world.build)")
    p.add_argument("--policy", required=True, help="the base policy whose sampled answers make the claims")
    p.add_argument(
        "--labeler",
        action="append",
        required=True,
        metavar="NAME=CHECKPOINT",
        help="a labeler to score, repeatable (e.g. generic=runs/demo/labeler_generic)",
    )
    p.add_argument("--split", default="feedback", help="the world split whose scenes are described (default feedback)")
    p.add_argument("--scenes", type=int, default=300, help="first scenes of the split")
    p.add_argument("--samples", type=int, default=4, help="sampled answers per scene (T 0.7)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu (default), auto or cuda[:i]")
    p.add_argument("--out", default=None, help="writes labeler_report.json and labeler_report.md here")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    from utils.dist import setup_logging

    setup_logging()
    a = make_parser().parse_args(argv)
    labelers = {}
    for item in a.labeler:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--labeler {item!r}: expected NAME=CHECKPOINT, e.g. generic=runs/demo/labeler_generic")
        labelers[name] = path
    results, _ = compare_labelers(
        a.world, a.policy, labelers, split=a.split, scenes=a.scenes, samples=a.samples, seed=a.seed, device=a.device
    )
    table = report_table(results)
    print(table)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "labeler_report.json").write_text(json.dumps(results, indent=2))
        (out / "labeler_report.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
