"""Inference-time scaling in the synthetic world: best-of-N with the self-feedback reward against the oracle's pick.

    python -m muffin.world.scaling --world runs/world_demo/world --policy base=runs/world_demo/base \\
        --policy aligned=runs/world_demo/loop/final --reward-model runs/world_demo/loop/final \\
        --reward-reference runs/world_demo/base --split test --n 1 2 4 8 16 --seeds 0 1 2 --out runs/scaling

Each policy samples ``max(n)`` answers per held-out scene (T 0.7, seeded per scene and answer); the first N of them
are the candidates of best-of-N, so every N is scored on the same samples. Selectors: ``reward`` (the highest
per-token reward of ``--reward-model`` against ``--reward-reference``, ``muffin.reward``) and ``oracle`` (the fewest
hallucinated objects by the world's ground truth, then the most recalled: the upper bound a reward can reach).
Writes ``scaling.json``, ``scaling.md`` and ``scaling.png`` (CHAIR-i and recall against N).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eval.chair import chair_summary
from muffin.decoding import CANDIDATE_SAMPLING, Decoding
from muffin.family import Sample, load_family
from muffin.feedback.stage import stable_seed
from muffin.inference import generate
from muffin.reward import SelfReward, best_index
from muffin.world.evaluate import chair_scores
from utils.images import load_image
from utils.io import atomic_write_json, atomic_write_text, read_jsonl

logger = logging.getLogger(__name__)

METRICS = ("chair_i", "response_hallucination", "recall")


def sample_answers(
    family: Any, world: Path, split: str, n: int, seed: int, decoding: Decoding, limit: int | None, batch_size: int
) -> list[dict[str, Any]]:
    """``n`` answers per scene prompt, answer i of prompt p seeded by (seed, p, i); records carry ``sample_idx``."""
    prompts = read_jsonl(world / split / "prompts.jsonl")[:limit]
    samples, seeds, recs = [], [], []
    for p in prompts:
        img = load_image(world / p["image_path"], what=f"prompt '{p['ds_question_id']}'")
        for i in range(n):
            samples.append(Sample(img, p["question"]))  # one image object: the prompt is prefilled once per batch
            seeds.append(stable_seed("scaling", seed, p["ds_question_id"], i))
            recs.append({"id": f"{p['ds_question_id']}#{i}", "image_id": p["metainfos"]["image_id"],
                         "question": p["question"], "prompt_id": p["ds_question_id"], "sample_idx": i})  # fmt: skip
    answers = generate(family, samples, decoding, seeds=seeds, batch_size=batch_size, progress=True)
    return [{**r, "answer": a} for r, a in zip(recs, answers)]


def oracle_index(details: Sequence[dict[str, Any]]) -> int:
    """The candidate with the fewest hallucinated mentions, then the most recalled classes, then the first."""
    return min(
        range(len(details)), key=lambda i: (len(details[i]["hallucinated"]), -len(details[i]["correct_objects"]))
    )


def best_of_n_table(
    details: Sequence[dict[str, Any]], rewards: Sequence[Any], ns: Sequence[int]
) -> dict[str, dict[int, dict[str, Any]]]:
    """CHAIR of the reward's and the oracle's picks among each prompt's first N candidates, for every N.

    ``details`` and ``rewards`` are aligned per answer and grouped by prompt in sample order (``sample_idx``)."""
    by_prompt: dict[str, list[int]] = {}
    for k, d in enumerate(details):
        by_prompt.setdefault(d["prompt_id"], []).append(k)
    out: dict[str, dict[int, dict[str, Any]]] = {"reward": {}, "oracle": {}}
    for n in ns:
        for selector in out:
            picked = []
            for idx in by_prompt.values():
                cand = idx[:n]
                j = (
                    best_index([rewards[k] for k in cand])
                    if selector == "reward"
                    else oracle_index([details[k] for k in cand])
                )
                picked.append(details[cand[j]])
            out[selector][n] = chair_summary(picked)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    world = Path(args.world)
    ns = sorted(set(args.n))
    decoding = CANDIDATE_SAMPLING.replace(max_new_tokens=args.max_new_tokens)
    reward = SelfReward(args.reward_model, args.reward_reference, device=args.device, batch_size=args.batch_size)
    results: dict[str, Any] = {"config": vars(args), "runs": {}}
    for spec in args.policy:
        name, path = spec.split("=", 1)
        loaded = {
            Path(args.reward_model).resolve(): reward.aligned,
            Path(args.reward_reference).resolve(): reward.reference,
        }
        family = loaded.get(Path(path).resolve()) or load_family(path, device=args.device)  # each model loaded once
        for seed in args.seeds:
            cache = Path(args.out) / f"{name}_seed{seed}.jsonl"
            if cache.is_file():
                answers = read_jsonl(cache)
            else:
                answers = sample_answers(
                    family, world, args.split, max(ns), seed, decoding, args.limit, args.batch_size
                )
                atomic_write_text(cache, "".join(json.dumps(a) + "\n" for a in answers))
            _, details = chair_scores(world, args.split, answers)
            details = [{**d, "prompt_id": a["prompt_id"]} for d, a in zip(details, answers)]
            groups: dict[str, list[dict[str, Any]]] = {}
            for a in answers:
                groups.setdefault(a["prompt_id"], []).append(a)
            images = {
                p["ds_question_id"]: world / p["image_path"] for p in read_jsonl(world / args.split / "prompts.jsonl")
            }
            scored = reward.score_groups(
                [(images[pid], g[0]["question"], [a["answer"] for a in g]) for pid, g in groups.items()], progress=True
            )
            rewards = [r for rs in scored for r in rs]
            results["runs"][f"{name}/seed{seed}"] = best_of_n_table(details, rewards, ns)
            logger.info("%s seed %d: done", name, seed)
    results["summary"] = summarize(results["runs"], ns)
    return results


def summarize(runs: dict[str, Any], ns: Sequence[int]) -> dict[str, Any]:
    """Mean and sd over seeds of each metric, per policy, selector and N."""
    out: dict[str, Any] = {}
    for key, table in runs.items():
        name = key.split("/")[0]
        for selector, per_n in table.items():
            for n in ns:
                row = out.setdefault(name, {}).setdefault(selector, {}).setdefault(str(n), {m: [] for m in METRICS})
                for m in METRICS:
                    row[m].append(per_n[n][m])
    for name in out:
        for selector in out[name]:
            for n, row in out[name][selector].items():
                out[name][selector][n] = {m: _mean_sd(v) for m, v in row.items()}
    return out


def _mean_sd(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean and sd over the runs where the metric is defined (a ratio with no mentions is None)."""
    v = [x for x in values if x is not None]
    return {
        "mean": statistics.fmean(v) if v else None,
        "sd": statistics.stdev(v) if len(v) > 1 else 0.0,
        "runs": list(values),
    }


def _pct(r: dict[str, Any]) -> str:
    return "-" if r["mean"] is None else f"{100 * r['mean']:.1f} ± {100 * r['sd']:.1f}"


def table_md(summary: dict[str, Any], ns: Sequence[int]) -> str:
    lines = ["| policy | selector | N | CHAIR-i % | response hall. % | recall % |", "|---|---|---|---|---|---|"]
    for name, sel in summary.items():
        for selector, rows in sel.items():
            for n in ns:
                r = rows[str(n)]
                cells = [_pct(r[m]) for m in METRICS]
                lines.append(f"| {name} | {selector} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], ns: Sequence[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, label in zip(axes, ("chair_i", "recall"), ("CHAIR-i (%)", "recall (%)")):
        for name, sel in summary.items():
            for selector, style in (("reward", "-o"), ("oracle", ":s")):
                pts = [
                    (n, sel[selector][str(n)][metric]) for n in ns if sel[selector][str(n)][metric]["mean"] is not None
                ]
                xs = [n for n, _ in pts]
                ys = [100 * r["mean"] for _, r in pts]
                es = [100 * r["sd"] for _, r in pts]
                ax.errorbar(xs, ys, yerr=es, fmt=style, capsize=3, label=f"{name}, {selector}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(ns), [str(n) for n in ns])
        ax.set_xlabel("N (best of N samples)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Best-of-N in the synthetic world: self-feedback reward vs oracle (mean ± sd over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Best-of-N with the self-feedback reward on a synthetic world split.")
    p.add_argument("--world", required=True)
    p.add_argument("--policy", action="append", required=True, help="NAME=CHECKPOINT (repeat: base, aligned, ...)")
    p.add_argument("--reward-model", required=True, help="the reward's aligned checkpoint")
    p.add_argument("--reward-reference", required=True, help="the checkpoint it was aligned from")
    p.add_argument("--split", default="test")
    p.add_argument("--n", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--limit", type=int, default=None, help="first K scenes of the split")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None)
    p.add_argument("--out", required=True)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for spec in args.policy:
        if "=" not in spec:
            raise SystemExit(f"error: --policy takes NAME=CHECKPOINT, got '{spec}'")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = run(args)
    ns = sorted(set(args.n))
    atomic_write_json(out / "scaling.json", res)
    atomic_write_text(out / "scaling.md", table_md(res["summary"], ns))
    plot(res["summary"], ns, out / "scaling.png")
    print(table_md(res["summary"], ns))


if __name__ == "__main__":
    main()
