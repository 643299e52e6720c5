"""The iterative loop's final report: a table per iteration and per checkpoint, and PNG plots.

Written by ``muffin.loop.Loop.run`` into the loop's output directory: ``report.json`` (everything), ``report.md``
(the tables), ``hallucination.png`` (held-out metrics per iteration), ``checkpoints.png`` (selection metrics of
every checkpoint of every iteration) and, on a synthetic world, ``sources.png`` (its checks per hallucination source).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from utils.io import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def relative_change(base: float | None, value: float | None) -> float | None:
    """(value - base) / base; None when the base is 0 or either is undefined (no answer mentioned an object)."""
    return None if not base or value is None else (value - base) / base


def _num(x: float | None) -> float:
    return float("nan") if x is None else 100 * x


def iteration_rows(states: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary row per iteration from the stages' summaries (``iter<k>/state.json``)."""
    rows = []
    for k, st in enumerate(states):
        done = st["done"]
        conquer, select = done.get("autocheck") or done.get("reward") or done.get("conquer") or {}, done["select"]
        acc = conquer.get("labeler_vs_ground_truth") or {}
        rows.append(
            {
                "iteration": k + 1,
                "answers": done["generate"].get("answers_ok"),
                "mean_answer_words": done["generate"].get("mean_answer_words"),
                "claims": conquer.get("claims"),
                "share_false": conquer.get("share_false"),
                "labeler_accuracy": acc.get("accuracy"),
                "labeler_balanced_accuracy": acc.get("balanced_accuracy"),
                "labeler_auc": acc.get("auc"),
                "labeler_by_kind": acc.get("by_kind"),
                "labeler_absent_object_auc": acc.get("absent_object_auc"),
                "labeler_kind_auc": acc.get("kind_auc"),
                "pairs": done["pairs"].get("pairs"),
                "pairs_balanced": done["balance"].get("pairs_out"),
                "pair_signal": done["balance"].get("pairs_vs_ground_truth"),
                "mean_len_chosen": done["balance"].get("mean_len_chosen_after"),
                "mean_len_rejected": done["balance"].get("mean_len_rejected_after"),
                "dpo_steps": done["train"].get("steps"),
                "selected": select["checkpoint"] + (" (too few pairs)" if select.get("skipped") else ""),
                "seconds": round(sum(st.get("seconds", {}).values()), 1),
            }
        )
    return rows


def world_checks_table(table: Sequence[dict[str, Any]]) -> list[str]:
    """The synthetic world's checks beyond CHAIR per round (``muffin.world.metrics``; rows' ``world``): instances and
    counts, each hallucination source's error rate, and place sentences per answer (what omission lowers)."""
    lines = [
        "",
        "## Held-out checks beyond CHAIR, per hallucination source (synthetic world)",
        "",
        "| iteration | instance precision % | count accuracy % | partner % | other class % | colour errors % | "
        "overcounts % | undercounts % | place errors % | place claims per answer |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        w = r.get("world")
        if w:
            cells = [_pct(w.get(k)) for k in ("instance_precision", "count_accuracy", "partner_rate", "other_rate")]
            cells += [
                _pct(w.get(k)) for k in ("colour_error", "overcount_error", "undercount_error", "position_error")
            ]
            per = (w.get("per_answer") or {}).get("place_claims")
            name = "base" if r["iteration"] == 0 else r["iteration"]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {'-' if per is None else f'{per:.2f}'} |")
    return lines


def pair_signal_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Per round, what the balanced pairs teach about each kind of error (``muffin.world.metrics.pair_signal``,
    rows' ``pair_signal``): the share of pairs whose chosen answer makes fewer such errors than the rejected one,
    minus the share where it makes more. Empty when no round has it (no ground truth)."""
    signals = [r.get("pair_signal") for r in rows]
    if not any(signals):
        return []
    kinds = list(next(s for s in signals if s)["by_kind"])
    lines = [
        "",
        "## What the pairs teach, per kind of error (ground truth; % of balanced pairs: net = chosen has fewer such "
        "errors than rejected - has more, (fewer / more))",
        "",
        "| iter | pairs | " + " | ".join(kinds) + " |",
        "|---|---|" + "---|" * len(kinds),
    ]
    for r, s in zip(rows, signals):
        if s:
            n = s["pairs"]
            cells = [
                f"{100 * t['net']:+.1f} ({100 * t['fewer'] / n:.0f} / {100 * t['more'] / n:.0f})"
                if t["net"] is not None
                else "-"
                for t in (s["by_kind"][k] for k in kinds)
            ]
            lines.append(f"| {r['iteration']} | {s['pairs']} | " + " | ".join(cells) + " |")
    return lines


def to_markdown(
    table: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]], states: Sequence[dict[str, Any]]
) -> str:
    base = table[0]
    lines = [
        "## Held-out benchmark (Object HalBench CHAIR)",
        "",
        "| iteration | CHAIR-i % | response hall. % | recall % | words | CHAIR-i vs base | resp. vs base |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in table:
        ci = relative_change(base["chair_i"], r["chair_i"])
        rs = relative_change(base["response_hallucination"], r["response_hallucination"])
        lines.append(
            f"| {'base' if r['iteration'] == 0 else r['iteration']} | {_pct(r['chair_i'])} | "
            f"{_pct(r['response_hallucination'])} | {_pct(r['recall'])} | {r['mean_length'] or 0:.1f} | "
            f"{_pct(ci) if r['iteration'] else '-'} | {_pct(rs) if r['iteration'] else '-'} |"
        )
    if any(r.get("hallucination_sources") for r in table):
        lines += [
            "",
            "## Held-out hallucinations by source (synthetic world; mentions read by the world's parser)",
            "",
            "| iteration | mentions | hallucinated | co-occurrence partner | other | in place sentences |",
            "|---|---|---|---|---|---|",
        ]
        for r in table:
            h = r.get("hallucination_sources")
            if h:
                lines.append(
                    f"| {'base' if r['iteration'] == 0 else r['iteration']} | {h['mentions']} | {h['hallucinated']} | "
                    f"{h['partner']} | {h['other']} | {h['in_place_sentence']} |"
                )
    if any(r.get("world") for r in table):
        lines += world_checks_table(table)
    lines += [
        "",
        "## Feedback and training per iteration",
        "",
        "| iter | answers | claims | judged false % | labeler acc. % (balanced) | labeler AUC | pairs | balanced | "
        "len chosen / rejected | DPO steps | selected | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        acc = (
            "-"
            if r["labeler_accuracy"] is None
            else f"{_pct(r['labeler_accuracy'])} ({_pct(r['labeler_balanced_accuracy'])})"
        )
        lens = f"{r['mean_len_chosen']} / {r['mean_len_rejected']}"
        auc = "-" if r.get("labeler_auc") is None else f"{r['labeler_auc']:.2f}"
        lines.append(
            f"| {r['iteration']} | {r['answers']} | {r['claims']} | {_pct(r['share_false'])} | {acc} | {auc} | "
            f"{r['pairs']} | {r['pairs_balanced']} | {lens} | {r['dpo_steps']} | {r['selected']} | "
            f"{r['seconds']} |"
        )
    if any(r.get("labeler_by_kind") for r in rows):
        from muffin.world.oracle import CLAIM_KINDS as kinds

        lines += [
            "",
            "## Labeler against ground truth, by claim kind (claims, % false, AUC)",
            "",
            "| iter | " + " | ".join(kinds) + " | AUC within kinds | absent-object AUC |",
            "|---|" + "---|" * (len(kinds) + 2),
        ]
        for r in rows:
            by = r.get("labeler_by_kind") or {}
            cells = [
                "-"
                if k not in by
                else f"{by[k]['claims']}, {_pct(by[k]['share_false'])}, "
                + ("-" if by[k]["auc"] is None else f"{by[k]['auc']:.2f}")
                for k in kinds
            ]
            cells += [
                "-" if r.get(key) is None else f"{r[key]:.2f}"
                for key in ("labeler_kind_auc", "labeler_absent_object_auc")
            ]
            lines.append(f"| {r['iteration']} | " + " | ".join(cells) + " |")
    lines += pair_signal_table(rows)
    lines += [
        "",
        "## Selection benchmark, every checkpoint",
        "",
        "| iter | checkpoint | CHAIR-i % | response hall. % | recall % |",
        "|---|---|---|---|---|",
    ]
    for k, st in enumerate(states, 1):
        for name, m in st["done"]["evaluate"].items():
            mark = " (selected)" if name == st["done"]["select"]["checkpoint"] else ""
            lines.append(
                f"| {k} | {name}{mark} | {_pct(m['chair_i'])} | {_pct(m['response_hallucination'])} | "
                f"{_pct(m['recall'])} |"
            )
    return "\n".join(lines) + "\n"


def plot(out: Path, table: Sequence[dict[str, Any]], states: Sequence[dict[str, Any]]) -> list[Path]:
    """``hallucination.png`` and ``checkpoints.png``; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [r["iteration"] for r in table]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (
        ("chair_i", "CHAIR-i (mention)"),
        ("response_hallucination", "response-level"),
        ("recall", "object recall"),
    ):
        ax.plot(its, [_num(r[key]) for r in table], marker="o", label=label)
    ax.set_xlabel("iteration (0 = base policy)")
    ax.set_ylabel("%")
    ax.set_xticks(its)
    ax.set_title("Held-out Object HalBench")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths = [out / "hallucination.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for k, st in enumerate(states, 1):
        ev = st["done"]["evaluate"]
        names = [n for n in ev if n != "start"]
        steps = [0] + [int(n.split("-")[-1]) for n in names]
        for ax, key in zip(axes, ("chair_i", "recall")):
            ax.plot(
                steps, [_num(ev["start"][key])] + [_num(ev[n][key]) for n in names], marker="o", label=f"iteration {k}"
            )
    for ax, title in zip(axes, ("CHAIR-i % (selection set)", "recall % (selection set)")):
        ax.set_xlabel("DPO step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    paths.append(out / "checkpoints.png")
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    if any(r.get("world") for r in table):
        paths.append(plot_world_checks(out / "sources.png", table))
    return paths


def plot_world_checks(path: Path, table: Sequence[dict[str, Any]]) -> Path:
    """``sources.png``: each hallucination source's error rate per round, next to instance precision and count
    accuracy (the synthetic world's held-out checks, rows' ``world``)."""
    import matplotlib.pyplot as plt

    rows = [r for r in table if r.get("world")]
    its = [r["iteration"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (
        ("partner_rate", "partner (absent co-occurring class)"),
        ("other_rate", "other absent class"),
        ("colour_error", "colour"),
        ("overcount_error", "count (one too many)"),
        ("undercount_error", "undercount (an omission)"),
        ("position_error", "position"),
    ):
        ls = "--" if key == "undercount_error" else "-"  # not a hallucination: drawn apart from the sources
        axes[0].plot(its, [_num(r["world"].get(key)) for r in rows], marker="o", ls=ls, label=label)
    for key, label in (("instance_precision", "instance precision"), ("count_accuracy", "count accuracy")):
        axes[1].plot(its, [_num(r["world"].get(key)) for r in rows], marker="o", label=label)
    axes[1].plot(its, [_num(r.get("recall")) for r in rows], marker="o", label="object recall (CHAIR)")
    for ax, title in zip(axes, ("error rate by hallucination source, %", "instances, counts and recall, %")):
        ax.set_xlabel("iteration (0 = base policy)")
        ax.set_xticks(its)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(
    out: Path, cfg: Any, states: Sequence[dict[str, Any]], table: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """Write report.json / report.md / the plots; returns the report (``markdown`` holds the tables)."""
    rows = iteration_rows(states)
    md = to_markdown(table, rows, states)
    report = {
        "config": asdict(cfg),
        "heldout": list(table),
        "iterations": rows,
        "checkpoints": [st["done"]["evaluate"] for st in states],
        "markdown": md,
        "plots": [str(p) for p in plot(out, table, states)],
    }
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", "# RLAIF-V iterative loop\n\n" + md)
    logger.info("report written to %s", out / "report.md")
    return report
