"""The embedded demo's glue: the loop configuration for a world, and the check of what the demo must show.

    python -m muffin.world.demo config --world runs/demo/world --policy runs/demo/base --out runs/demo/loop
    python -m muffin.world.demo run --config runs/demo/loop.json
    python -m muffin.world.demo check --report runs/demo/loop/report.json
    python -m muffin.world.demo install --assets script/demo/assets/world_seed0 --world runs/demo/world --out runs/demo

``config`` prints a ``muffin.loop`` configuration (JSON) that aligns the world's base policy with the feedback of
``--labeler`` (default ``initial``: the base labels its own answers; the demo script passes the world's labeler,
``muffin.world.labeler``), the rule-based splitter and question maker, checkpoint selection
on the world's ``val`` split and the final table on its held-out ``test`` split. ``check`` reads the loop's report
and says whether the final policy's CHAIR-i, response-level hallucination and the error rate of each hallucination
source (``muffin.world.metrics``: partner, colour, count, position) are at most half of the base policy's, with
recall and count accuracy down at most 5 points (the demo's bar); it exits 1 when not.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from transformers.hf_argparser import string_to_bool

from muffin.loop import Benchmark, LoopConfig

# Greedy answers of at most 96 tokens: the world's descriptions are shorter; beam search triples the CPU time.
WORLD_DECODING = {"max_new_tokens": 96, "num_beams": 1}


def loop_config(world: str | Path, policy: str | Path, out: str | Path, **overrides: Any) -> dict[str, Any]:
    """A CPU-sized loop over the world: 4 iterations (the paper's count) of 300 feedback prompts x 10 samples at
    T 0.7 (the paper's sampling), at most 4 pairs per prompt, 60 DPO steps of 8 pairs with a checkpoint every 10.

    DPO learning rate 2e-5: with oracle feedback on the demo's base, 5e-5 over 73 pairs raised CHAIR-i on the
    selection split after 20 steps, 2e-5 lowered it (measured; see CHANGELOG.md). The world needs
    ``iterations x prompts_per_iteration`` feedback scenes (``build_base.sh`` draws 1200); fewer are reused. A round
    is taken only when a checkpoint beats its start on val (``keep_start``; the paper's loop takes one always).
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
        # CHAIR sees only absent classes; instance precision checks class, colour and count (muffin.world.metrics)
        "metric": "instance_precision",
        "max_recall_drop": 0.05,
        # a round is taken only when one of its checkpoints beats the round's start on the val split: over 3 world
        # seeds this turned AI feedback's CHAIR-i change from +13 +- 25 % into -9 +- 4 % (script/world/compare.sh)
        "keep_start": True,
        "seed": 0,
    }
    cfg.update(overrides)
    return cfg


def loop_fields() -> dict[str, set[str]]:
    """The fields ``--set`` may name, by dotted prefix: the loop config's (``LoopConfig``), ``dpo``'s
    (``DPOConfig``) and the benchmarks' (``Benchmark``)."""
    from muffin.train.args import DPOConfig

    bench = {f.name for f in dataclasses.fields(Benchmark)}
    return {
        "": {f.name for f in dataclasses.fields(LoopConfig)},
        "dpo": {f.name for f in dataclasses.fields(DPOConfig)},
        "selection": bench,
        "report_benchmark": bench,
    }


def apply_sets(cfg: dict[str, Any], sets: Sequence[str], fields: dict[str, set[str]] | None = None) -> dict[str, Any]:
    """``cfg`` with each ``KEY=VALUE`` of ``sets`` applied: a dotted key reaches into a nested dict (``dpo.max_steps``),
    the value is read as JSON when it parses (``120``, ``2e-5``, ``true``) and kept as a string otherwise. The key
    must be in ``cfg`` already or be a field of its place (``fields``, by dotted prefix; default ``loop_fields()``,
    so ``score=expected`` or ``dpo.beta=0.2`` work): a typo would otherwise run hours of a loop with the default
    silently."""
    fields = loop_fields() if fields is None else fields
    out = json.loads(json.dumps(cfg))
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. --set dpo.max_steps=120")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node, parts = out, key.split(".")
        for i, part in enumerate(parts):
            prefix = ".".join(parts[:i])
            known = set(node) | fields.get(prefix, set()) if isinstance(node, dict) else set()
            if part not in known:
                close = difflib.get_close_matches(part, sorted(known), n=3)
                raise KeyError(
                    f"--set {item!r}: {prefix or 'the loop config'} has no field '{part}'"
                    + (f" (did you mean {', '.join(close)}?)" if close else "")
                    + (f"; fields in this config: {', '.join(sorted(node))}" if isinstance(node, dict) else "")
                )
            if i == len(parts) - 1:
                node[part] = value
            else:
                if node.get(part) is None:  # e.g. report_benchmark left to default to selection
                    node[part] = {}
                node = node[part]
    return out


def one_shot(cfg: dict[str, Any]) -> dict[str, Any]:
    """The same budget as ``cfg`` in ONE round: every prompt of the K rounds sampled from the base policy, and the
    K rounds' DPO steps (hence the same number of pairs seen) in one training run with as many checkpoints as the
    K rounds evaluate together (``save_steps`` unchanged: K x max_steps / save_steps of them, on the same grid of
    steps). The paper's claim is that iterating (fresh samples from the improved policy each round) learns better
    than this."""
    k = int(cfg["iterations"])
    dpo = dict(cfg["dpo"])
    dpo["max_steps"] = k * int(dpo["max_steps"])
    out = dict(cfg, iterations=1, dpo=dpo)
    if cfg.get("prompts_per_iteration"):
        out["prompts_per_iteration"] = k * int(cfg["prompts_per_iteration"])
    return out


def compare(runs: Sequence[str | Path]) -> dict[str, Any]:
    """Mean and spread over seeds of each variant's held-out result. ``runs``: loop dirs named
    ``.../s<seed>/<variant>`` (the layout of ``script/world/compare.sh``), each holding a finished report.json."""
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        path = Path(r) / "report.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: that loop has not finished (rerun compare.sh to resume it)")
        rep = json.loads(path.read_text())
        base, final = rep["heldout"][0], rep["heldout"][-1]
        its = rep.get("iterations", [])
        by_variant.setdefault(Path(r).name, []).append(
            {
                "seed": Path(r).parent.name,
                "base": {k: base[k] for k in ("chair_i", "response_hallucination", "recall")},
                "final": {k: final[k] for k in ("chair_i", "response_hallucination", "recall")},
                "chair_i_change": final["chair_i"] / base["chair_i"] - 1,
                "response_change": final["response_hallucination"] / base["response_hallucination"] - 1,
                "recall_change": final["recall"] - base["recall"],
                "pairs": sum(int(i.get("pairs_balanced") or 0) for i in its),
                "labeler_auc": [i.get("labeler_auc") for i in its],
                **source_changes(base, final),
            }
        )
    summary = {}
    for name, rows in by_variant.items():
        summary[name] = {"seeds": [r["seed"] for r in rows], "runs": rows}
        for key in ("chair_i_change", "response_change", "recall_change", "pairs", *SOURCE_CHANGES):
            vals = np.array([r.get(key, np.nan) for r in rows], dtype=float)
            vals = vals[~np.isnan(vals)]
            if len(vals):
                sd = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
                summary[name][key] = {"mean": float(vals.mean()), "sd": sd}
    return summary


# the world's checks compared per run (muffin.world.metrics): each source's relative change, count accuracy's points
SOURCE_CHANGES = ("partner_rate_change", "colour_error_change", "overcount_error_change", "position_error_change")
SOURCE_CHANGES += ("count_accuracy_change",)


def source_changes(base: dict[str, Any], final: dict[str, Any]) -> dict[str, float]:
    """Final against base for the world's checks a report's rows hold (none for an older report)."""
    out = {}
    for key in BAR_MEASURES[2:]:
        b, f = measure(base, key), measure(final, key)
        if b and f is not None:
            out[f"{key}_change"] = f / b - 1
    b, f = measure(base, "count_accuracy"), measure(final, "count_accuracy")
    if b is not None and f is not None:
        out["count_accuracy_change"] = f - b
    return out


def compare_table(summary: dict[str, Any]) -> str:
    lines = [
        "| variant | seeds | CHAIR-i change % | response hall. change % | recall change (points) | pairs used | "
        "partner / colour / overcount / position errors change % | count accuracy change (points) |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def ms(s: dict[str, Any], key: str, scale: float = 100.0, fmt: str = "{:+.1f}") -> str:
        if key not in s:
            return "-"
        return f"{fmt.format(scale * s[key]['mean'])} ± {scale * s[key]['sd']:.1f}"

    for name, s in summary.items():
        lines.append(
            f"| {name} | {len(s['seeds'])} | {ms(s, 'chair_i_change')} | {ms(s, 'response_change')} | "
            f"{ms(s, 'recall_change')} | {ms(s, 'pairs', 1.0, '{:.0f}')} | "
            + " / ".join(ms(s, k) for k in SOURCE_CHANGES[:4])
            + f" | {ms(s, 'count_accuracy_change')} |"
        )
    return "\n".join(lines)


def plot_compare(summary: dict[str, Any], path: str | Path, *, bar: float = -50.0) -> None:
    """Bars of the mean relative change of CHAIR-i and response hallucination per variant, one dot per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 3.6))
    for j, (key, label) in enumerate((("chair_i_change", "CHAIR-i"), ("response_change", "response hall."))):
        xs = np.arange(len(names)) + (j - 0.5) * 0.38
        ax.bar(xs, [100 * summary[n][key]["mean"] for n in names], width=0.36, label=label, alpha=0.8)
        for x, n in zip(xs, names):
            ax.plot([x] * len(summary[n]["runs"]), [100 * r[key] for r in summary[n]["runs"]], "k.", ms=5)
    ax.axhline(bar, color="grey", ls="--", lw=0.8, label=f"bar ({bar:+.0f} %)")
    ax.set_xticks(np.arange(len(names)), names, rotation=15)
    ax.set_ylabel("change vs base on held-out scenes (%)")
    ax.legend(frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# The demo's bar: each of these at most half of the base's on the held-out split (CHAIR's two numbers and the rate
# of each planted source, muffin.world.metrics; the count source is an overcount, one object too many), ...
BAR_MEASURES = (
    "chair_i",
    "response_hallucination",
    "partner_rate",
    "colour_error",
    "overcount_error",
    "position_error",
)
# ... and each of these down at most 5 points (count accuracy also falls when the policy undercounts: omissions)
KEPT_MEASURES = ("recall", "count_accuracy")


def measure(row: dict[str, Any], key: str) -> float | None:
    """A held-out row's number: CHAIR's keys are the row's, the world's checks are under ``world``."""
    return row[key] if key in row else (row.get("world") or {}).get(key)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def check(report: dict[str, Any], *, max_ratio: float = 0.5, max_drop: float = 0.05) -> list[str]:
    """Failures of the demo's bar (empty when it passes): final vs base on the held-out table, ``BAR_MEASURES``
    at most ``max_ratio`` of the base's, ``KEPT_MEASURES`` at most ``max_drop`` below it. A report without the
    world's checks (an older loop) is judged on CHAIR and recall alone."""
    base, final = report["heldout"][0], report["heldout"][-1]
    has_world = measure(base, "count_accuracy") is not None
    failures = []
    for key in BAR_MEASURES + KEPT_MEASURES:
        if key not in ("chair_i", "response_hallucination", "recall") and not has_world:
            continue
        b, f = measure(base, key), measure(final, key)
        if b is None or f is None:
            failures.append(f"{key} is undefined (no answer made such a claim); nothing to compare")
        elif key in BAR_MEASURES and f > max_ratio * b:
            failures.append(f"{key}: final {f:.4f} > {max_ratio} x base {b:.4f}")
        elif key in KEPT_MEASURES and b - f > max_drop:
            failures.append(f"{key}: final {f:.4f} is more than {max_drop} below base {b:.4f}")
    return failures


# What a shipped base policy and labeler depend on: the scenes and descriptions they were trained on, and the val
# scenes the bootstrap and the labeler measure themselves on. The other splits may differ (the demo's test split is
# larger than the one the assets were built with).
ASSET_WORLD_KEYS = ("world", "captions", "sft_per_scene")
ASSET_SPLITS = ("sft", "val")


def install_assets(assets: str | Path, world: str | Path, out: str | Path) -> list[str]:
    """Copy a shipped base policy and labeler (``assets/base``, ``assets/labeler``, written by
    ``script/demo/make_assets.sh``) into ``out`` next to ``world``, after checking that ``world`` was built as the
    one they were trained on (``assets/world_manifest.json``). Returns the names copied (none when ``out`` already
    has them); raises ``ValueError`` naming the differing settings otherwise."""
    assets, world, out = Path(assets), Path(world), Path(out)
    for need in (assets / "world_manifest.json", assets / "base" / "manifest.json", world / "manifest.json"):
        if not need.is_file():
            raise FileNotFoundError(
                f"{need} is missing (assets: script/demo/make_assets.sh; world: muffin.world.build)"
            )
    shipped = json.loads((assets / "world_manifest.json").read_text())["config"]
    built = json.loads((world / "manifest.json").read_text())["config"]
    diff = [k for k in ASSET_WORLD_KEYS if shipped.get(k) != built.get(k)]
    diff += [f"splits.{s}" for s in ASSET_SPLITS if shipped["splits"].get(s) != built["splits"].get(s)]
    if diff:
        raise ValueError(
            f"world '{world}' differs from the one the assets in '{assets}' were trained on in {', '.join(diff)} "
            f"(shipped: { {k: shipped.get(k) for k in ASSET_WORLD_KEYS} }, splits {shipped['splits']}); build the "
            "world with the shipped settings, or rebuild the assets for this world (REBUILD=1)"
        )
    copied = []
    for name in ("base", "labeler"):
        if (assets / name).is_dir() and not (out / name / "manifest.json").is_file():
            shutil.copytree(assets / name, out / name, dirs_exist_ok=True)
            copied.append(name)
    return copied


class WorldGroundTruth:
    """The world's ground truth for the loop (``muffin.loop.LoopTruth``): oracle verdicts, the labeler's accuracy,
    each checkpoint's checks beyond CHAIR on a world split (``muffin.world.metrics``, selectable), and on a held-out
    world split where each policy's hallucinations come from, those checks in full and POPE on its first scenes."""

    def __init__(self, world: str | Path, *, pope_scenes: int = 100, batch_size: int = 8) -> None:
        from muffin.world.oracle import WorldTruth

        self.truth = WorldTruth(world)
        self.pope_scenes, self.batch_size = pope_scenes, batch_size
        self._scenes: dict[str, dict[int, Any]] = {}

    def scenes_of(self, bench: Benchmark) -> dict[int, Any] | None:
        """The scenes of the world whose description prompts ``bench`` answers, by image id (None otherwise)."""
        from muffin.world.oracle import WorldTruth, is_world

        root = bench.image_root
        if bench.kind != "objhal" or not root or not is_world(root):
            return None
        if root not in self._scenes:
            self._scenes[root] = WorldTruth(root).scenes
        return self._scenes[root]

    def metrics(self, bench: Benchmark, out_dir: Path) -> dict[str, Any]:
        from muffin.world.metrics import SELECTION, world_metrics
        from utils.io import read_jsonl

        scenes = self.scenes_of(bench)
        if scenes is None:
            return {}
        checked = world_metrics(read_jsonl(out_dir / "answers.jsonl"), scenes)
        return {k: checked[k] for k in SELECTION}

    def check(self, questions: list[dict[str, Any]], out_path: Path) -> list[dict[str, Any]]:
        from muffin.world.oracle import oracle_check

        return oracle_check(questions, self.truth, out_path)

    def labeler_accuracy(self, checked: list[dict[str, Any]]) -> dict[str, Any]:
        from muffin.world.oracle import feedback_accuracy

        return feedback_accuracy(checked, self.truth)

    def pair_signal(self, pairs: list[dict[str, Any]]) -> dict[str, Any]:
        from muffin.world.metrics import pair_signal

        return pair_signal(pairs, self.truth.scene)

    def heldout(self, model_path: str, bench: Benchmark, out_dir: Path) -> dict[str, Any]:
        from muffin.world.metrics import world_metrics
        from muffin.world.oracle import hallucination_sources
        from utils.io import read_jsonl

        scenes = self.scenes_of(bench)
        if scenes is None:
            return {}
        answers = read_jsonl(out_dir / "answers.jsonl")
        row: dict[str, Any] = {
            "hallucination_sources": hallucination_sources(answers, scenes),
            "world": world_metrics(answers, scenes),
        }
        if self.pope_scenes:  # a discriminative score next to CHAIR
            row["pope"] = world_pope(model_path, bench, out_dir / "pope", self.pope_scenes, self.batch_size)
        return row


def world_pope(model_path: str, bench: Benchmark, out_dir: Path, scenes: int, batch_size: int) -> dict[str, Any]:
    """POPE (``muffin.world.evaluate.pope_split``) of ``model_path`` on the first ``scenes`` scenes of the world
    split ``bench`` reads: the mean over the three strategies and each strategy's F1; cached in ``out_dir``."""
    done = out_dir / "results.json"
    if done.is_file():
        m = json.loads(done.read_text())["metrics"]
    else:
        from muffin.family import load_family
        from muffin.world.evaluate import pope_split

        split = Path(bench.questions).parent.name  # <world>/<split>/prompts.jsonl
        m = pope_split(load_family(model_path), bench.image_root, split, limit=scenes, batch_size=batch_size,
                       progress=False, out_dir=out_dir)  # fmt: skip
    return {**m["mean"], **{f"f1_{k}": v["f1"] for k, v in m["splits"].items()}, "n": m["n_scored"]}


def world_truth(cfg: LoopConfig) -> WorldGroundTruth:
    """The loop's truth hook for a config whose ``world`` is set."""
    return WorldGroundTruth(cfg.world, pope_scenes=cfg.pope_scenes, batch_size=cfg.batch_size)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Loop configuration and pass check for the synthetic-world demo.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("config", help="print the loop configuration JSON for a world and a base policy")
    c.add_argument("--world", required=True)
    c.add_argument("--policy", required=True, help="the base policy checkpoint (python -m muffin.world.bootstrap)")
    c.add_argument("--out", required=True, help="the loop's output directory")
    c.add_argument("--iterations", type=int, default=4)
    c.add_argument("--labeler", default="initial", help="initial | policy | oracle | a checkpoint path")
    c.add_argument(
        "--schedule", default="iterative", choices=["iterative", "one-shot"], help="one-shot: see one_shot()"
    )
    c.add_argument("--seed", type=int, default=0, help="the loop's seed (sampling, DPO data order)")
    c.add_argument(
        "--keep-start",
        type=string_to_bool,
        default=True,
        help="a round's start policy competes in the selection (default true; false: the paper's loop)",
    )
    c.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field, repeatable; dotted keys reach into dpo/selection (e.g. --set dpo.max_steps=120 "
        "--set prompts_per_iteration=600); applied before --schedule one-shot scales the budget",
    )
    m = sub.add_parser("compare", help="mean and spread over seeds of finished loops (dirs .../s<seed>/<variant>)")
    m.add_argument("runs", nargs="+")
    m.add_argument("--out", required=True, help="writes compare.json, compare.md and compare.png here")
    m.add_argument("--bar", type=float, default=-50.0, help="the plot's dashed line, in %% (CPU demo -50, GPU -70)")
    i = sub.add_parser("install", help="copy the shipped base policy and labeler next to a world built like theirs")
    i.add_argument("--assets", required=True, help="directory with base/, labeler/ and world_manifest.json")
    i.add_argument("--world", required=True, help="the world directory (python -m muffin.world.build)")
    i.add_argument("--out", required=True, help="where base/ and labeler/ go")
    r = sub.add_parser("run", help="run muffin.loop on a config with the world's ground truth (its 'world')")
    r.add_argument("--config", required=True, help="loop configuration JSON (python -m muffin.world.demo config)")
    r.add_argument("--iterations", type=int, default=None, help="override the config's number of iterations")
    k = sub.add_parser("check", help="check the demo's bar on a loop report")
    k.add_argument("--report", required=True, help="report.json written by muffin.loop")
    s = sub.add_parser("pairs", help="what each round's balanced pairs teach per kind of error (also for older loops)")
    s.add_argument("loop", help="a loop's output directory (iter<k>/balanced.jsonl)")
    s.add_argument("--world", required=True, help="the world the loop's prompts come from")
    return p


def loop_pair_signals(loop: str | Path, world: str | Path) -> list[dict[str, Any]]:
    """``metrics.pair_signal`` of every round of a finished (or running) loop, from its ``balanced.jsonl`` files."""
    from muffin.world.metrics import pair_signal
    from muffin.world.oracle import WorldTruth
    from utils.io import read_jsonl

    truth = WorldTruth(world)
    rounds = sorted(Path(loop).glob("iter*/balanced.jsonl"), key=lambda p: int(p.parent.name[4:]))
    if not rounds:
        raise FileNotFoundError(
            f"{loop} has no iter<k>/balanced.jsonl: not a loop directory, or no round balanced yet"
        )
    return [{"iteration": int(p.parent.name[4:]) + 1, "pair_signal": pair_signal(read_jsonl(p), truth.scene)}
            for p in rounds]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    a = make_parser().parse_args(argv)
    if a.command == "config":
        cfg = loop_config(
            a.world, a.policy, a.out, iterations=a.iterations, labeler=a.labeler, seed=a.seed, keep_start=a.keep_start
        )
        try:
            cfg = apply_sets(cfg, a.sets)
        except (KeyError, ValueError) as e:
            sys.exit(f"muffin.world.demo config: {e.args[0]}")
        print(json.dumps(one_shot(cfg) if a.schedule == "one-shot" else cfg, indent=2))
        return
    if a.command == "run":
        from muffin.loop import main as loop_main

        loop_main(["--config", a.config] + ([] if a.iterations is None else ["--iterations", str(a.iterations)]),
                  truth=world_truth)  # fmt: skip
        return
    if a.command == "compare":
        summary = compare(a.runs)
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.json").write_text(json.dumps(summary, indent=2))
        table = compare_table(summary)
        (out / "compare.md").write_text(table + "\n")
        plot_compare(summary, out / "compare.png", bar=a.bar)
        print(table)
        return
    if a.command == "pairs":
        from muffin.loop_report import pair_signal_table

        try:
            rows = loop_pair_signals(a.loop, a.world)
        except (FileNotFoundError, KeyError) as e:
            sys.exit(f"muffin.world.demo pairs: {e}")
        print("\n".join(pair_signal_table(rows)).strip())
        return
    if a.command == "install":
        try:
            copied = install_assets(a.assets, a.world, a.out)
        except (FileNotFoundError, ValueError) as e:
            sys.exit(f"muffin.world.demo install: {e}")
        print(f"installed {', '.join(copied) or 'nothing (already there)'} from {a.assets} into {a.out}")
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
    for name, row in (("base", base), ("final", final)):
        if measure(row, "count_accuracy") is not None:  # the world's checks beyond CHAIR (muffin.world.metrics)
            w = {
                k: measure(row, k)
                for k in ("instance_precision", "count_accuracy", "undercount_error") + BAR_MEASURES[2:]
            }
            print(
                f"{name}: instance precision {_pct(w['instance_precision'])}%  count accuracy "
                f"{_pct(w['count_accuracy'])}%  errors by source: partner {_pct(w['partner_rate'])}%  colour "
                f"{_pct(w['colour_error'])}%  overcount {_pct(w['overcount_error'])}%  position {_pct(w['position_error'])}%"
                f"  (undercounts, omissions: {_pct(w['undercount_error'])}%)"
            )
    for name, row in (("base", base), ("final", final)):
        if row.get("pope"):  # the discriminative score (POPE on the held-out split's first scenes; no judge)
            p = row["pope"]
            print(
                f"{name}: POPE F1 {100 * p['f1']:.1f}%  accuracy {100 * p['accuracy']:.1f}%  yes-ratio "
                f"{100 * p['yes_ratio']:.1f}%  (adversarial F1 {100 * p['f1_adversarial']:.1f}%, {p['n']} questions)"
            )
    for it in report.get("iterations", []):
        if it.get("labeler_accuracy") is not None:
            print(
                f"labeler, iteration {it['iteration']}: claim accuracy vs ground truth "
                f"{100 * it['labeler_accuracy']:.1f}% (balanced {100 * it['labeler_balanced_accuracy']:.1f}%, "
                f"AUC {it.get('labeler_auc') or float('nan'):.2f}) on {it['claims']} claims"
                + (
                    f"; absent-object AUC {it['labeler_absent_object_auc']:.2f}"
                    if it.get("labeler_absent_object_auc") is not None
                    else ""
                )
            )
    print(
        "PASS: hallucination at most half of the base, recall within 5 points"
        if not failures
        else "FAIL: " + "; ".join(failures)
    )
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
