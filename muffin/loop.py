"""The iterative RLAIF-V loop: K rounds of feedback from the current policy, DPO, checkpoint selection.

    python -m muffin.loop --config runs/demo/loop.json

Each iteration runs generate -> divide -> changeq -> conquer -> pairs -> balance -> export -> reference log-probs
+ DPO with periodic checkpoints -> evaluate every checkpoint on the selection benchmark -> select the best, which
becomes the next iteration's policy (RLAIF-V sec. 3.3, "iterative alignment"; the paper runs 4); a round left with
fewer than ``min_pairs`` balanced pairs trains nothing and keeps its policy. One JSON file
configures it (``LoopConfig``). Every stage writes its files under ``<output_dir>/iter<k>/`` and records itself
in ``iter<k>/state.json``: a rerun skips finished stages and resumes unfinished ones (the stages resume their own
partial outputs, DPO from its last checkpoint). ``report.md``/``report.json`` and PNG plots (``muffin.loop_report``)
are written at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from utils.io import atomic_write_json, read_jsonl, write_manifest

logger = logging.getLogger(__name__)

BENCHMARK_KINDS = ("objhal", "pope", "amber")
# selection metrics and which way is better; pope_* and amber_f1/accuracy need a benchmark of that kind
SELECTION_METRICS = {
    "chair_i": "min",
    "chair_s": "min",
    "response_hallucination": "min",
    "pope_f1": "max",
    "pope_accuracy": "max",
    "amber_f1": "max",
    "amber_accuracy": "max",
}
# a synthetic world's benchmark also has the checks CHAIR lacks (instances, counts, colours, places; per source):
# muffin.world.metrics.SELECTION, spelled out here so that importing the loop does not import the world
SELECTION_METRICS |= {
    "instance_precision": "max",
    "count_accuracy": "max",
    "partner_rate": "min",
    "colour_error": "min",
    "count_error": "min",
    "position_error": "min",
    "source_error": "min",
}
STAGES = ("generate", "divide", "changeq", "conquer", "pairs", "balance", "export", "train", "evaluate", "select")


@dataclass
class Benchmark:
    """A selection / report benchmark; ``kind`` picks it (none of them needs a judge model):

    - ``objhal`` (default): description questions on images with COCO ground truth, CHAIR by rule extraction.
      ``questions`` is any file ``eval.answer.objhal_questions`` reads (``image_id``, ``question``, ``image_path``);
      the synthetic world's ``<world>/<split>/prompts.jsonl`` is one; ``annotations`` the COCO instances file(s).
    - ``pope``: ``questions`` a POPE question file or folder (``eval.pope``); metrics ``pope_f1``, ``pope_accuracy``.
    - ``amber``: ``questions`` an AMBER query file, ``data_dir`` AMBER's ``data/`` folder (``eval.amber``, word
      processing "auto"); metrics ``amber_*``, with AMBER's CHAIR, Hal and Cover also under ``chair_i``,
      ``response_hallucination`` / ``chair_s`` and ``recall`` (the same kinds of number) for the loop's tables.

    ``decoding`` overrides the family's chat decoding (``muffin.decoding.Decoding`` fields), ``limit`` keeps the
    first N questions.
    """

    questions: str
    annotations: list[str] = field(default_factory=list)
    image_root: str | None = None
    synonyms: str | None = None
    captions: list[str] = field(default_factory=list)
    limit: int | None = None
    decoding: dict[str, Any] | None = None
    kind: str = "objhal"
    data_dir: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in BENCHMARK_KINDS:
            raise ValueError(f"unknown benchmark kind '{self.kind}'. Available: {', '.join(BENCHMARK_KINDS)}")
        if self.kind == "objhal" and not self.annotations:
            raise ValueError("an objhal benchmark needs 'annotations' (COCO instances file(s))")
        if self.kind == "amber" and not self.data_dir:
            raise ValueError("an amber benchmark needs 'data_dir' (AMBER's data/ folder with annotations.json)")

    @classmethod
    def for_world(cls, world: str | Path, split: str, **kw: Any) -> Benchmark:
        """The synthetic world's split as a benchmark (its prompts, instances and synonym table)."""
        w = Path(world)
        return cls(
            str(w / split / "prompts.jsonl"),
            [str(w / split / "instances.json")],
            image_root=str(w),
            synonyms=str(w / "synonyms.txt"),
            **kw,
        )


@dataclass
class LoopConfig:
    """Everything one loop run needs; ``LoopConfig.from_file`` reads it from JSON."""

    output_dir: str
    policy: str  # initial policy checkpoint (any family)
    prompts: str  # pipeline input JSONL (ds_question_id, image_path, question)
    selection: Benchmark  # checkpoints are chosen on this benchmark
    image_root: str | None = None
    report_benchmark: Benchmark | None = None  # held-out benchmark of the final table (default: selection)
    labeler: str = "initial"  # "initial" (the initial policy), "policy" (each round's policy), "oracle", or a path
    splitter: str = "rule"  # "rule" or a chat-LM checkpoint (muffin.feedback.divide)
    splitter_prompt_file: str | None = None
    changeq: str = "rule"
    changeq_prompt_file: str | None = None
    world: str | None = None  # synthetic world dir: measures the labeler against ground truth; needed by "oracle"
    iterations: int = 4
    prompts_per_iteration: int | None = None  # disjoint slices of the prompt file; None: every prompt each round
    num_samples: int = 10
    temperature: float = 0.7
    max_new_tokens: int = 512
    batch_size: int = 8  # generation and labeler batches
    max_pairs: int = 2
    min_diff: float = 1  # the pair's score gap; with score "expected" a fraction such as 0.5
    score: str = "count"  # answer score: "count" (the paper's) or "expected" (muffin.feedback.autocheck)
    balance: bool = True
    # a round with fewer balanced pairs trains nothing and keeps its start policy: on the GPU world (seed 1) the
    # length balance left 7 pairs, and 120 DPO steps of 8 on them raised CHAIR-i 8x over 4 rounds
    min_pairs: int = 64
    dpo: dict[str, Any] = field(default_factory=dict)  # muffin.train.args.DPOConfig fields
    metric: str = "chair_i"  # selection: lowest value wins...
    max_recall_drop: float = 0.05  # ...among checkpoints whose recall is at most this much below the BASE policy's
    keep_start: bool = False  # the round's start policy is a candidate too: a round that helps none is not taken
    pope_scenes: int = 100  # report on a world split: POPE (yes/no, no judge) on its first N scenes too; 0: off
    # fixed models behind OpenAI-compatible servers (comma-separated base URLs; docs/SERVING.md). The policy is
    # trained every round, so it is always loaded here.
    labeler_server: str | None = None
    labeler_top_logprobs: int = 20  # served labeler: the first token's alternatives read (P(yes), P(no))
    splitter_server: str | None = None
    changeq_server: str | None = None
    feedback: str = "claims"  # "claims": divide and conquer (the paper); "reward": reward-ranked (muffin.reward)
    reward_model: str | None = None  # "reward": the aligned checkpoint whose reward ranks the answers
    reward_reference: str = "initial"  # "reward": the checkpoint it was aligned from ("initial": the loop's policy)
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.selection, dict):
            self.selection = Benchmark(**self.selection)
        if isinstance(self.report_benchmark, dict):
            self.report_benchmark = Benchmark(**self.report_benchmark)
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")
        if self.num_samples < 2:
            raise ValueError(f"num_samples must be >= 2 to form pairs, got {self.num_samples} (paper: 10)")
        if self.feedback not in ("claims", "reward"):
            raise ValueError(f"feedback must be 'claims' or 'reward', got {self.feedback!r}")
        if self.feedback == "reward" and not self.reward_model:
            raise ValueError("feedback 'reward' needs reward_model: the aligned checkpoint whose reward ranks answers")
        if self.labeler == "oracle" and not self.world:
            raise ValueError("labeler 'oracle' reads the ground truth of a synthetic world: set 'world' to its dir")
        if self.metric not in SELECTION_METRICS:
            raise ValueError(f"unknown selection metric '{self.metric}'. Available: {', '.join(SELECTION_METRICS)}")
        if self.metric.split("_")[0] in ("pope", "amber") and self.selection.kind != self.metric.split("_")[0]:
            raise ValueError(
                f"selection metric '{self.metric}' needs a selection benchmark of kind "
                f"'{self.metric.split('_')[0]}', not '{self.selection.kind}'"
            )
        if self.selection.kind == "pope" and self.metric not in ("pope_f1", "pope_accuracy"):
            raise ValueError(f"a pope selection benchmark has no '{self.metric}'; use metric pope_f1 or pope_accuracy")
        from muffin.feedback.autocheck import SCORES

        if self.score not in SCORES:
            raise ValueError(
                f"unknown answer score '{self.score}'. Available: {', '.join(SCORES)} (count: the paper's)"
            )
        if self.min_pairs < 1:
            raise ValueError(f"min_pairs must be >= 1, got {self.min_pairs}")
        if not self.min_diff > 0:
            raise ValueError(f"min_diff must be > 0, got {self.min_diff}")
        bad = set(self.dpo) - {f.name for f in fields(_dpo_config_class())}
        if bad:
            raise ValueError(f"unknown DPO settings {sorted(bad)} in 'dpo'; use muffin.train.args.DPOConfig fields")

    @classmethod
    def from_file(cls, path: str | Path) -> LoopConfig:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read loop config '{path}': {e}") from e
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"{path}: unknown fields {sorted(unknown)}. Known: {', '.join(sorted(known))}")
        return cls(**raw)


def _dpo_config_class() -> type:
    from muffin.train.args import DPOConfig

    return DPOConfig


class StageState:
    """``iter<k>/state.json``: finished stages with their summaries, rewritten atomically after each stage."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {"done": {}}

    def done(self, stage: str) -> bool:
        return stage in self.data["done"]

    def get(self, stage: str) -> Any:
        return self.data["done"][stage]

    def finish(self, stage: str, summary: Any, started: float) -> None:
        self.data["done"][stage] = summary
        self.data.setdefault("seconds", {})[stage] = round(time.time() - started, 2)
        atomic_write_json(self.path, self.data)


def _load(path: str) -> Any:
    from muffin.family import load_family

    return load_family(path)  # the GPU when there is one


def evaluate_checkpoint(model_path: str, bench: Benchmark, out_dir: Path, *, batch_size: int = 8) -> dict[str, Any]:
    """Answer the benchmark's questions with ``model_path`` and score CHAIR; cached in ``out_dir/results.json``."""
    from eval.answer import objhal_questions, run_answers
    from eval.objhal import evaluate_objhal
    from muffin.decoding import Decoding

    done = out_dir / "metrics.json"
    if done.is_file():
        return json.loads(done.read_text())
    if bench.kind != "objhal":
        metrics = _evaluate_gpt_free(model_path, bench, out_dir, batch_size=batch_size)
        atomic_write_json(done, metrics)
        return metrics
    family = _load(model_path)
    questions = objhal_questions(bench.questions, bench.image_root)[: bench.limit]
    decoding = Decoding(**bench.decoding) if bench.decoding else family.chat_decoding
    answers_file = run_answers(
        family, questions, out_dir / "answers.jsonl", decoding=decoding, batch_size=batch_size, progress=False
    )
    answers = [a for a in read_jsonl(answers_file) if a.get("answer") is not None]
    res = evaluate_objhal(  # our counting: its metric names are the ones selection reads (docs/BENCHMARK_PARITY.md)
        answers,
        bench.annotations,
        protocol="ours",
        synonyms_path=bench.synonyms,
        captions_path=bench.captions or None,
        out_dir=out_dir,
    )
    metrics = {
        k: res["metrics"][k]
        for k in ("chair_i", "chair_s", "response_hallucination", "recall", "mean_length", "n_answers", "n_mentions")
    }
    atomic_write_json(done, metrics)
    return metrics


def _evaluate_gpt_free(model_path: str, bench: Benchmark, out_dir: Path, *, batch_size: int) -> dict[str, Any]:
    """POPE or AMBER metrics of ``model_path`` (``Benchmark`` says which keys each gives)."""
    from eval.answer import BENCHMARKS, run_answers
    from muffin.decoding import Decoding

    family = _load(model_path)
    questions = BENCHMARKS[bench.kind](bench.questions, bench.image_root)[: bench.limit]
    decoding = Decoding(**bench.decoding) if bench.decoding else family.chat_decoding
    answers = read_jsonl(
        run_answers(
            family, questions, out_dir / "answers.jsonl", decoding=decoding, batch_size=batch_size, progress=False
        )
    )
    none = dict.fromkeys(("chair_i", "chair_s", "response_hallucination", "recall", "mean_length"))
    if bench.kind == "pope":
        from eval.pope import evaluate_pope

        m = evaluate_pope(answers, bench.questions, out_dir=out_dir)["metrics"]
        pope = {f"pope_{k}": v for k, v in m["mean"].items()}
        return {**none, **pope, "n_answers": m["n_scored"]}
    from eval.amber import evaluate_amber

    m = evaluate_amber(answers, bench.data_dir, out_dir=out_dir)["metrics"]
    gen, dis = m.get("generative", {}), m.get("discriminative", {}).get("overall", {})
    amber = {f"amber_{k}": gen.get(k) for k in ("chair", "cover", "hal", "cog")}
    amber |= {"amber_accuracy": dis.get("accuracy"), "amber_f1": dis.get("f1"), "amber_nlp": m["nlp"]["backend"]}
    mapped = {"chair_i": gen.get("chair"), "chair_s": gen.get("hal"), "response_hallucination": gen.get("hal")}
    return {**none, **mapped, "recall": gen.get("cover"), **amber, "n_answers": m["n_records"] - m["n_errors"]}


def world_scenes(bench: Benchmark) -> dict[int, Any] | None:
    """The scenes of the synthetic world a benchmark's images come from (its ``image_root`` is a world directory),
    by image id; None for any other benchmark."""
    from muffin.world.oracle import WorldTruth, is_world

    return WorldTruth(bench.image_root).scenes if bench.image_root and is_world(bench.image_root) else None


def world_pope(model_path: str, bench: Benchmark, out_dir: Path, scenes: int, batch_size: int) -> dict[str, Any]:
    """POPE (``muffin.world.evaluate.pope_split``) of ``model_path`` on the first ``scenes`` scenes of the world
    split ``bench`` reads: the mean over the three strategies and each strategy's F1; cached in ``out_dir``."""
    done = out_dir / "results.json"
    if done.is_file():
        m = json.loads(done.read_text())["metrics"]
    else:
        from muffin.world.evaluate import pope_split

        split = Path(bench.questions).parent.name  # <world>/<split>/prompts.jsonl
        m = pope_split(
            _load(model_path),
            bench.image_root,
            split,
            limit=scenes,
            batch_size=batch_size,
            progress=False,
            out_dir=out_dir,
        )
    return {**m["mean"], **{f"f1_{k}": v["f1"] for k, v in m["splits"].items()}, "n": m["n_scored"]}


def select_checkpoint(
    candidates: dict[str, dict[str, Any]], reference: dict[str, Any], metric: str, max_recall_drop: float
) -> str:
    """The candidate with the best ``metric`` (lowest; highest for the scores ``SELECTION_METRICS`` marks "max")
    among those whose recall is at least ``reference`` recall minus ``max_recall_drop`` (all candidates when none
    is; a benchmark without recall, POPE, constrains nothing); ties go to the higher recall, then the later
    checkpoint.

    The loop passes the base policy's metrics as ``reference`` (iteration 0's start), so recall cannot drift down
    by ``max_recall_drop`` in every iteration."""

    # an undefined metric (no answer mentioned an object) ranks last, an undefined recall counts as 0
    def val(m: dict[str, Any], key: str, missing: float) -> float:
        return missing if m.get(key) is None else m[key]

    sign = -1.0 if SELECTION_METRICS.get(metric) == "max" else 1.0
    floor = val(reference, "recall", 0.0) - max_recall_drop
    eligible = {k: m for k, m in candidates.items() if val(m, "recall", 0.0) >= floor} or candidates
    order = list(candidates)
    return min(
        eligible,
        key=lambda k: (
            sign * val(eligible[k], metric, sign * float("inf")),
            -val(eligible[k], "recall", 0.0),
            -order.index(k),
        ),
    )


def base_metrics(out_dir: Path, k: int, start: dict[str, Any]) -> dict[str, Any]:
    """The base policy's selection metrics: ``start`` in iteration 0, else iteration 0's evaluated start."""
    if k == 0:
        return start
    first = StageState(out_dir / "iter0" / "state.json")
    if not first.done("evaluate"):
        raise RuntimeError(f"{out_dir}/iter0 has no evaluated start policy; run the loop from iteration 0")
    return first.get("evaluate")["start"]


class Loop:
    """Runs a ``LoopConfig``; ``run()`` does every iteration then the report (see the module docstring)."""

    def __init__(self, cfg: LoopConfig) -> None:
        from muffin.feedback.records import load_prompts

        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.prompts, self.prompt_errors = load_prompts(cfg.prompts, cfg.image_root)
        if not self.prompts:
            raise ValueError(f"{cfg.prompts}: no valid prompt; see the warnings above for each line's problem")
        self.truth = None
        if cfg.world:
            from muffin.world.oracle import WorldTruth

            self.truth = WorldTruth(cfg.world)

    # ------------------------------------------------------------------ helpers
    def prompts_of(self, k: int) -> list[Any]:
        n = self.cfg.prompts_per_iteration
        if not n:
            return list(self.prompts)
        start = (k * n) % len(self.prompts)
        return (self.prompts * 2)[start : start + min(n, len(self.prompts))]  # wraps around a short file

    def policy_of(self, k: int) -> str:
        if k == 0:
            return self.cfg.policy
        prev = StageState(self.out / f"iter{k - 1}" / "state.json")
        if not prev.done("select"):
            raise RuntimeError(f"iteration {k - 1} has not finished; run the loop again to finish it first")
        return prev.get("select")["policy"]

    def labeler_of(self, policy: str) -> str:
        return {"initial": self.cfg.policy, "policy": policy}.get(self.cfg.labeler, self.cfg.labeler)

    # ------------------------------------------------------------------ one iteration
    def iteration(self, k: int) -> dict[str, Any]:
        """Run (or resume) iteration ``k``; returns its state (stage summaries)."""
        it = self.out / f"iter{k}"
        it.mkdir(parents=True, exist_ok=True)
        state = StageState(it / "state.json")
        policy = self.policy_of(k)
        prompts = self.prompts_of(k)
        logger.info("iteration %d: policy %s, %d prompts", k, policy, len(prompts))
        for stage in STAGES:
            if state.done(stage):
                continue
            started = time.time()
            summary = getattr(self, f"_stage_{stage}")(k, it, policy, prompts, state)
            state.finish(stage, summary, started)
            logger.info("iteration %d: %s done (%.1fs)", k, stage, time.time() - started)
        write_manifest(
            it / "manifest.json",
            stage="loop_iteration",
            config=asdict(self.cfg),
            counts={s: state.get(s) for s in STAGES},
            started=time.time(),
            iteration=k,
            seconds=state.data.get("seconds", {}),
            policy=policy,
        )
        return state.data

    def _stage_generate(self, k: int, it: Path, policy: str, prompts: list[Any], state: StageState) -> Any:
        from muffin.decoding import CANDIDATE_SAMPLING
        from muffin.feedback.generate import GenerateConfig, run_generate, summarize

        decoding = CANDIDATE_SAMPLING.replace(temperature=self.cfg.temperature, max_new_tokens=self.cfg.max_new_tokens)
        cfg = GenerateConfig(
            num_samples=self.cfg.num_samples,
            seed=self.cfg.seed * 1000 + k,
            batch_size=self.cfg.batch_size,
            decoding=decoding,
            policy=Path(policy).name,
        )
        recs = run_generate(_load(policy), prompts, it / "answers.jsonl", cfg, progress=False)
        return summarize(recs)

    def _stage_divide(self, k: int, it: Path, policy: str, prompts: list[Any], state: StageState) -> Any:
        from muffin.feedback.divide import DivideConfig, run_divide, summarize

        if self.cfg.feedback == "reward":
            return {"skipped": "reward-ranked feedback has no claims"}

        lm, splitter = _text_lm(self.cfg.splitter, self.cfg.splitter_server, it / "claims.requests.sqlite")
        cfg = DivideConfig(splitter=splitter, prompt_file=self.cfg.splitter_prompt_file)
        return summarize(run_divide(read_jsonl(it / "answers.jsonl"), it / "claims.jsonl", cfg, lm=lm, progress=False))

    def _stage_changeq(self, k: int, it: Path, policy: str, prompts: list[Any], state: StageState) -> Any:
        from muffin.feedback.changeq import ChangeqConfig, run_changeq, summarize

        if self.cfg.feedback == "reward":
            return {"skipped": "reward-ranked feedback has no claims"}

        lm, changeq = _text_lm(self.cfg.changeq, self.cfg.changeq_server, it / "questions.requests.sqlite")
        cfg = ChangeqConfig(changeq=changeq, prompt_file=self.cfg.changeq_prompt_file)
        recs = run_changeq(read_jsonl(it / "claims.jsonl"), it / "questions.jsonl", cfg, lm=lm, progress=False)
        return summarize(recs)

    def _stage_conquer(self, k: int, it: Path, policy: str, prompts: list[Any], state: StageState) -> Any:
        from muffin.feedback.autocheck import AutocheckConfig, run_autocheck, summarize

        if self.cfg.feedback == "reward":  # the reward ranks the answers; its records stand in for checked.jsonl
            from muffin.feedback.reward_feedback import run_rewards
            from muffin.reward import SelfReward

            ref = self.cfg.policy if self.cfg.reward_reference == "initial" else self.cfg.reward_reference
            reward = SelfReward(_load(self.cfg.reward_model), _load(ref), batch_size=self.cfg.batch_size)
            recs = run_rewards(
                reward, read_jsonl(it / "answers.jsonl"), prompts, str(it / "checked.jsonl"), progress=False
            )
            return {"answers": len(recs), "rewarded": sum(1 for r in recs if "reward_mean" in r)}
        questions = read_jsonl(it / "questions.jsonl")
        if self.cfg.labeler == "oracle":
            from muffin.world.oracle import oracle_check

            recs = oracle_check(questions, self.truth, it / "checked.jsonl")
        else:
            labeler = self.labeler_of(policy)
            if self.cfg.labeler_server:
                from muffin.feedback.served import ServedModel, served_identity

                served = ServedModel(self.cfg.labeler_server, cache=it / "checked.requests.sqlite")
                served.top_logprobs = self.cfg.labeler_top_logprobs
                cfg = AutocheckConfig(labeler=served.model, batch_size=self.cfg.batch_size, score=self.cfg.score)
                recs = run_autocheck(served, questions, prompts, it / "checked.jsonl", cfg,
                                     model_id=served_identity(served), progress=False)  # fmt: skip
            else:
                cfg = AutocheckConfig(labeler=Path(labeler).name, batch_size=self.cfg.batch_size, score=self.cfg.score)
                recs = run_autocheck(_load(labeler), questions, prompts, it / "checked.jsonl", cfg, progress=False)
        summary = summarize(recs)
        if self.truth is not None:
            from muffin.world.oracle import feedback_accuracy

            summary["labeler_vs_ground_truth"] = feedback_accuracy(recs, self.truth)
        return summary

    def _stage_pairs(self, k: int, it: Path, policy: str, prompts: list[Any], state: StageState) -> Any:
        from muffin.feedback.pairs import build_pairs, write_jsonl

        if self.cfg.feedback == "reward":
            from muffin.feedback.reward_feedback import build_reward_pairs

            pairs, stats = build_reward_pairs(read_jsonl(it / "checked.jsonl"), seed=self.cfg.seed * 1000 + k)
            write_jsonl(str(it / "pairs.jsonl"), pairs)
            return stats
        pairs, stats = build_pairs(
            read_jsonl(it / "checked.jsonl"),
            max_pairs=self.cfg.max_pairs,
            min_diff=self.cfg.min_diff,
            seed=self.cfg.seed * 1000 + k,
        )
        write_jsonl(str(it / "pairs.jsonl"), pairs)
        stats["zero_claim_answers"] = len(stats["zero_claim_answers"])
        stats.pop("score_spread", None)
        return stats

    def _stage_balance(self, k: int, it: Path, policy: str, prompts: list[Any], state: StageState) -> Any:
        from muffin.feedback.balance import balance_pairs
        from muffin.feedback.pairs import write_jsonl

        pairs = read_jsonl(it / "pairs.jsonl")
        if not self.cfg.balance:
            write_jsonl(str(it / "balanced.jsonl"), pairs)
            return {"pairs_out": len(pairs), "balanced": False}
        kept, stats = balance_pairs(pairs)
        write_jsonl(str(it / "balanced.jsonl"), kept)
        stats.pop("search", None)
        return stats

    def _stage_export(self, k: int, it: Path, policy: str, prompts: list[Any], state: StageState) -> Any:
        from muffin.feedback.export import run_export

        pairs = read_jsonl(it / "balanced.jsonl")
        if len(pairs) < self.cfg.min_pairs:
            reason = (
                f"{len(pairs)} balanced pairs < min_pairs {self.cfg.min_pairs}: no training this round, the start "
                f"policy carries on (see {it}/state.json: pairs and balance; more prompts, more samples per prompt "
                "or a higher temperature give the labeler more differences to rank)"
            )
            logger.warning("iteration %d: %s", k + 1, reason)
            return {"skipped": reason, "pairs": len(pairs)}
        return run_export(pairs, prompts, it / "pairs.parquet", origin_dataset=Path(self.cfg.prompts).stem)

    def _stage_train(self, k: int, it: Path, policy: str, prompts: list[Any], state: StageState) -> Any:
        from muffin.train.args import DPOConfig
        from muffin.train.train_dpo import train

        if state.get("export").get("skipped"):
            return {"steps": 0, "pairs": state.get("export")["pairs"], "skipped": state.get("export")["skipped"]}
        settings = {
            "save_strategy": "steps",
            "save_steps": 20,
            "report_to": "none",
            "logging_steps": 5,
            "seed": self.cfg.seed + k,
            "use_cpu": not torch.cuda.is_available(),
            **self.cfg.dpo,
        }
        args = DPOConfig(
            output_dir=str(it / "dpo"),
            model_path=policy,
            data=str(it / "pairs.parquet"),
            logps_dir=str(it / "reference_logps"),
            **settings,
        )
        trainer = train(args)
        return {
            "steps": trainer.state.global_step,
            "pairs": len(trainer.train_dataset),
            "log": [h for h in trainer.state.log_history if "loss" in h],
        }

    def _stage_evaluate(self, k: int, it: Path, policy: str, prompts: list[Any], state: StageState) -> Any:
        results = {"start": self.evaluate(policy, it / "eval" / "start")}
        if _round_skipped(state):
            return results
        for ckpt in checkpoints(it / "dpo"):
            results[ckpt.name] = self.evaluate(str(ckpt), it / "eval" / ckpt.name)
        return results

    def _stage_select(self, k: int, it: Path, policy: str, prompts: list[Any], state: StageState) -> Any:
        results = dict(state.get("evaluate"))
        start = results.pop("start")
        if _round_skipped(state):
            return {"checkpoint": "start", "policy": policy, "metrics": start, "start": start, "skipped": True}
        candidates = {"start": start, **results} if self.cfg.keep_start else results
        best = select_checkpoint(
            candidates, base_metrics(self.out, k, start), self.cfg.metric, self.cfg.max_recall_drop
        )
        if best == "start":  # no checkpoint beat the round's start on the selection benchmark: it carries on
            logger.info("iteration %d: no checkpoint beats the start policy; keeping %s", k + 1, policy)
            return {"checkpoint": "start", "policy": policy, "metrics": start, "start": start}
        path = materialize(it / "dpo" / best, policy, it / "policy")
        return {"checkpoint": best, "policy": str(path), "metrics": results[best], "start": start}

    def evaluate(self, model_path: str, out_dir: Path, bench: Benchmark | None = None) -> dict[str, Any]:
        return evaluate_checkpoint(model_path, bench or self.cfg.selection, out_dir, batch_size=self.cfg.batch_size)

    # ------------------------------------------------------------------ whole run
    def run(self) -> dict[str, Any]:
        """Every iteration (resuming), then the held-out table and the report."""
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.out / "loop_config.json", asdict(self.cfg))
        states = [self.iteration(k) for k in range(self.cfg.iterations)]
        bench = self.cfg.report_benchmark or self.cfg.selection
        scenes = world_scenes(bench)
        policies = [("base", self.cfg.policy)] + [
            (f"iter{k}", st["done"]["select"]["policy"]) for k, st in enumerate(states, 1)
        ]
        table = []
        for k, (name, policy) in enumerate(policies):
            out_dir = self.out / "report_eval" / name
            row = {"iteration": k, "policy": policy, **self.evaluate(policy, out_dir, bench)}
            if scenes is not None:  # a world's split: where the hallucinations come from
                from muffin.world.oracle import hallucination_sources

                row["hallucination_sources"] = hallucination_sources(read_jsonl(out_dir / "answers.jsonl"), scenes)
                if self.cfg.pope_scenes:  # a discriminative score next to CHAIR
                    row["pope"] = world_pope(
                        policy, bench, out_dir / "pope", self.cfg.pope_scenes, self.cfg.batch_size
                    )
            table.append(row)
        from muffin.loop_report import write_report

        return write_report(self.out, self.cfg, states, table)


def _round_skipped(state: StageState) -> bool:
    """Whether the round's training was skipped (too few pairs: ``LoopConfig.min_pairs``)."""
    return bool((state.data["done"].get("train") or {}).get("skipped"))


def checkpoints(dpo_dir: Path) -> list[Path]:
    """``checkpoint-<step>`` folders of a DPO run, by step."""
    found = [p for p in dpo_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    if not found:
        raise RuntimeError(
            f"{dpo_dir} holds no checkpoint-*; set dpo.save_steps (and max_steps) so that training "
            "saves at least one checkpoint to evaluate"
        )
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def materialize(ckpt: Path, base: str, out: Path) -> Path:
    """A full-weights directory for a checkpoint: itself, or (LoRA) the base with the adapter merged, saved."""
    info_file = ckpt / "rlaifv_checkpoint.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {"kind": "full"}
    if info.get("kind") != "lora":
        return ckpt
    if not (out / "config.json").is_file():
        from muffin.family import load_family

        load_family(base, lora_path=ckpt, device="cpu").save_pretrained(out)
    return out


def _text_lm(path: str, server: str | None, cache: Path) -> tuple:
    """The divide / change-question model and its recorded name (``muffin.feedback.served.text_model``)."""
    from muffin.feedback.served import ServedModel, text_model

    return text_model(path, ServedModel(server, cache=cache) if server else None)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Run K iterations of RLAIF-V (feedback, DPO, checkpoint selection).")
    p.add_argument("--config", required=True, help="loop configuration JSON (fields of muffin.loop.LoopConfig)")
    p.add_argument("--iterations", type=int, default=None, help="override the config's number of iterations")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    from utils.dist import setup_logging

    setup_logging()
    a = make_parser().parse_args(argv)
    cfg = LoopConfig.from_file(a.config)
    if a.iterations is not None:
        cfg.iterations = a.iterations
    report = Loop(cfg).run()
    print(report["markdown"])


if __name__ == "__main__":
    main()
