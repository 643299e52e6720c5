"""The embedded demo's glue: the loop configuration for a world, and the check of what the demo must show.

    python -m muffin.world.demo config --world runs/demo/world --policy runs/demo/base --out runs/demo/loop
    python -m muffin.world.demo check --report runs/demo/loop/report.json

``config`` prints a ``muffin.loop`` configuration (JSON) that aligns the world's base policy with the feedback of
``--labeler`` (default ``initial``: the base labels its own answers; the demo script passes the world's labeler,
``muffin.world.labeler``), the rule-based splitter and question maker, checkpoint selection
on the world's ``val`` split and the final table on its held-out ``test`` split. ``check`` reads the loop's report
and says whether the final policy's CHAIR-i and response-level hallucination are at most half of the base
policy's with recall down at most 5 points (the demo's bar); it exits 1 when not.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from muffin.loop import Benchmark

# Greedy answers of at most 96 tokens: the world's descriptions are shorter; beam search triples the CPU time.
WORLD_DECODING = {"max_new_tokens": 96, "num_beams": 1}


def loop_config(world: str | Path, policy: str | Path, out: str | Path, **overrides: Any) -> dict[str, Any]:
    """A CPU-sized loop over the world: 4 iterations (the paper's count) of 300 feedback prompts x 10 samples at
    T 0.7 (the paper's sampling), at most 4 pairs per prompt, 60 DPO steps of 8 pairs with a checkpoint every 10.

    DPO learning rate 2e-5: with oracle feedback on the demo's base, 5e-5 over 73 pairs raised CHAIR-i on the
    selection split after 20 steps, 2e-5 lowered it (measured; see CHANGELOG.md). The world needs
    ``iterations x prompts_per_iteration`` feedback scenes (``build_base.sh`` draws 1200); fewer are reused.
    """
    w = Path(world)
    cfg: dict[str, Any] = {
        "output_dir": str(out),
        "policy": str(policy),
        "prompts": str(w / "feedback" / "prompts.jsonl"),
        "image_root": str(w),
        "world": str(w),
        "labeler": "initial",
        "splitter": "rule",
        "changeq": "rule",
        "iterations": 4,
        "prompts_per_iteration": 300,
        "num_samples": 10,
        "temperature": 0.7,
        "max_new_tokens": 96,
        "batch_size": 96,  # generation, labeler and evaluation batches: outputs do not depend on it (tests)
        "max_pairs": 4,
        "dpo": {
            "learning_rate": 2e-5,
            "beta": 0.1,
            "max_steps": 60,
            "save_steps": 10,
            "per_device_train_batch_size": 8,
            "lr_scheduler_type": "constant",
            "warmup_steps": 0,
            "model_max_length": 256,
            "reference_batch_size": 32,
        },
        "selection": vars(Benchmark.for_world(w, "val", decoding=WORLD_DECODING)),
        "report_benchmark": vars(Benchmark.for_world(w, "test", decoding=WORLD_DECODING)),
        "metric": "chair_i",
        "max_recall_drop": 0.05,
        "seed": 0,
    }
    cfg.update(overrides)
    return cfg


def check(report: dict[str, Any], *, max_ratio: float = 0.5, max_recall_drop: float = 0.05) -> list[str]:
    """Failures of the demo's bar (empty when it passes): final vs base on the held-out table."""
    base, final = report["heldout"][0], report["heldout"][-1]
    failures = []
    for key in ("chair_i", "response_hallucination", "recall"):
        if final.get(key) is None or base.get(key) is None:
            return [f"{key} is undefined (no answer mentioned an object); nothing to compare"]
    for key in ("chair_i", "response_hallucination"):
        if final[key] > max_ratio * base[key]:
            failures.append(f"{key}: final {final[key]:.4f} > {max_ratio} x base {base[key]:.4f}")
    if base["recall"] - final["recall"] > max_recall_drop:
        failures.append(
            f"recall: final {final['recall']:.4f} is more than {max_recall_drop} below base {base['recall']:.4f}"
        )
    return failures


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Loop configuration and pass check for the synthetic-world demo.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("config", help="print the loop configuration JSON for a world and a base policy")
    c.add_argument("--world", required=True)
    c.add_argument("--policy", required=True, help="the base policy checkpoint (python -m muffin.world.bootstrap)")
    c.add_argument("--out", required=True, help="the loop's output directory")
    c.add_argument("--iterations", type=int, default=4)
    c.add_argument("--labeler", default="initial", help="initial | policy | oracle | a checkpoint path")
    k = sub.add_parser("check", help="check the demo's bar on a loop report")
    k.add_argument("--report", required=True, help="report.json written by muffin.loop")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    a = make_parser().parse_args(argv)
    if a.command == "config":
        print(json.dumps(loop_config(a.world, a.policy, a.out, iterations=a.iterations, labeler=a.labeler), indent=2))
        return
    report = json.loads(Path(a.report).read_text())
    failures = check(report)
    base, final = report["heldout"][0], report["heldout"][-1]
    print(
        f"base:  CHAIR-i {100 * base['chair_i']:.1f}%  response {100 * base['response_hallucination']:.1f}%  "
        f"recall {100 * base['recall']:.1f}%"
    )
    print(
        f"final: CHAIR-i {100 * final['chair_i']:.1f}%  response {100 * final['response_hallucination']:.1f}%  "
        f"recall {100 * final['recall']:.1f}%"
    )
    for it in report.get("iterations", []):
        if it.get("labeler_accuracy") is not None:
            print(
                f"labeler, iteration {it['iteration']}: claim accuracy vs ground truth "
                f"{100 * it['labeler_accuracy']:.1f}% (balanced {100 * it['labeler_balanced_accuracy']:.1f}%, "
                f"AUC {it.get('labeler_auc') or float('nan'):.2f}) on {it['claims']} claims"
            )
    print(
        "PASS: hallucination at most half of the base, recall within 5 points"
        if not failures
        else "FAIL: " + "; ".join(failures)
    )
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
