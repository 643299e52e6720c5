"""The iterative RLAIF-V loop: K rounds of feedback from the current policy, DPO, checkpoint selection.

    python -m muffin.loop --config loop.json        (a synthetic world's config: python -m muffin.world.demo run)

Each round runs the feedback stages of ``muffin.feedback.stages`` as the pipeline does, then reference log-probs + DPO
-> every checkpoint evaluated on the selection benchmark -> the best is the next round's policy (RLAIF-V sec. 3.3;
a round with fewer than ``min_pairs`` pairs keeps its policy). ``<output_dir>/iter<k>/state.json`` records each
finished stage: a rerun resumes. A world with known answers passes its ground truth through the ``truth`` hook.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import torch

from muffin.feedback.config import FeedbackConfig, knob, renamed_keys
from muffin.feedback.stages import (
    FILES,
    OLD_STAGE_NAMES,
    GroundTruth,
    Stage,
    StageRun,
    load_run_prompts,
    run_stage,
    stages_for,
)
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
    "overcount_error": "min",
    "position_error": "min",
    "source_error": "min",
}
LOOP_STAGES = ("train", "evaluate", "select")  # after the feedback stages (the table's, less its data report)
STAGES = tuple(s.name for s in stages_for("claims") if s.name != "report") + LOOP_STAGES


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


@dataclass(kw_only=True)
class LoopConfig(FeedbackConfig):
    """Everything one loop run needs: the feedback stages' knobs (``FeedbackConfig``: the same names as the
    pipeline's flags) and the loop's own; ``LoopConfig.from_file`` reads it from JSON. Labeler ``initial`` is the
    loop's first policy, ``policy`` each round's, ``oracle`` the ground truth of the ``truth`` hook."""

    output_dir: str = knob(MISSING, "the loop's directory: iter<k>/ per round, the report at the end")
    selection: Benchmark = knob(MISSING, "checkpoints are chosen on this benchmark")
    report_benchmark: Benchmark | None = knob(None, "held-out benchmark of the final table (default: selection)")
    world: str | None = knob(None, "a synthetic world's dir: its ground truth (the truth hook; needed by 'oracle')")
    iterations: int = knob(4, "rounds of feedback, DPO and selection (paper: 4)")
    prompts_per_iteration: int | None = knob(None, "disjoint slices of the prompt file; None: every prompt each round")
    # a round with fewer balanced pairs trains nothing and keeps its start policy: on the GPU world (seed 1) the
    # length balance left 7 pairs, and 120 DPO steps of 8 on them raised CHAIR-i 8x over 4 rounds
    min_pairs: int = knob(64, "a round with fewer balanced pairs trains nothing and keeps its start policy")
    dpo: dict[str, Any] = field(default_factory=dict, metadata={"help": "muffin.train.args.DPOConfig fields"})
    metric: str = knob("chair_i", "selection: lowest value wins (highest for pope_* / amber_f1 / amber_accuracy)...")
    max_recall_drop: float = knob(0.05, "...among checkpoints whose recall is at most this below the BASE policy's")
    keep_start: bool = knob(False, "the round's start policy is a candidate too: a round that helps none is not taken")
    pope_scenes: int = knob(100, "report on a world split: POPE (yes/no, no judge) on its first N scenes too; 0: off")

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.selection, dict):
            self.selection = Benchmark(**self.selection)
        if isinstance(self.report_benchmark, dict):
            self.report_benchmark = Benchmark(**self.report_benchmark)
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")
        if self.policy_server:
            raise ValueError("policy_server: the loop trains its policy every round, so it runs in this process; "
                             "remove policy_server (labeler_server, splitter_server, changeq_server may stay)")  # fmt: skip
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
        if self.min_pairs < 1:
            raise ValueError(f"min_pairs must be >= 1, got {self.min_pairs}")
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
        raw = renamed_keys(raw, str(path))
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"{path}: unknown fields {sorted(unknown)}. Known: {', '.join(sorted(known))}")
        return cls(**raw)


def _dpo_config_class() -> type:
    from muffin.train.args import DPOConfig

    return DPOConfig


class StageState:
    """``iter<k>/state.json``: finished stages with their summaries, rewritten atomically after each stage.
    ``renamed`` (old -> new stage name) reads a state an older loop wrote (``OLD_STAGE_NAMES``)."""

    def __init__(self, path: Path, renamed: dict[str, str] | None = None) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {"done": {}}
        for old, new in (renamed or {}).items():
            for part in ("done", "seconds"):
                entries = self.data.get(part, {})
                if old in entries and new not in entries:  # renamed in place: the stages keep their order
                    self.data[part] = {new if k == old else k: v for k, v in entries.items()}
                    if part == "done":
                        logger.warning("%s: stage '%s' is now called '%s'; read as such", path, old, new)

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


class LoopTruth(GroundTruth, Protocol):
    """The loop's hook for a world with known answers (``muffin.world.demo.WorldGroundTruth`` is one): the feedback
    stages' ``GroundTruth`` (oracle verdicts, the labeler's accuracy, what the pairs teach), its own checks of a
    checkpoint's answers (for selection) and extra held-out columns of a policy."""

    def metrics(self, bench: Benchmark, out_dir: Path) -> dict[str, Any]:
        """Numbers added to a checkpoint's benchmark metrics, which selection can read (``SELECTION_METRICS``);
        ``out_dir`` holds its answers. Empty for a benchmark the truth knows nothing of."""
        ...

    def heldout(self, model_path: str, bench: Benchmark, out_dir: Path) -> dict[str, Any]:
        """Columns added to the policy's row of the final table (``out_dir`` holds its benchmark answers)."""
        ...


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

    def __init__(self, cfg: LoopConfig, *, truth: LoopTruth | None = None) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.prompts, self.prompt_errors = load_run_prompts(cfg)
        if not self.prompts:
            raise ValueError(f"{cfg.prompts}: no valid prompt; see the warnings above for each line's problem")
        self.truth = truth
        if cfg.labeler == "oracle" and truth is None:
            raise ValueError("labeler 'oracle' needs the world's ground truth: pass truth= (python -m muffin.world.demo "
                             "run --config LOOP.json does)")  # fmt: skip
        self.table = tuple(s for s in stages_for(cfg.feedback) if s.name != "report")  # the loop writes its own
        self.stages = tuple(s.name for s in self.table) + LOOP_STAGES

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

    def stage_run(self, k: int, it: Path, policy: str, prompts: list[Any]) -> StageRun:
        """The feedback stages' run of iteration ``k``: its directory, policy, prompts and seed."""
        return StageRun(cfg=self.cfg, work_dir=it, prompts=prompts, policy=policy, seed=self.cfg.seed * 1000 + k,
                        truth=self.truth, progress=False, files=iteration_files(it, self.cfg.feedback))  # fmt: skip

    # ------------------------------------------------------------------ one iteration
    def iteration(self, k: int, *, stop_after: str | None = None) -> dict[str, Any]:
        """Run (or resume) iteration ``k`` (up to the stage ``stop_after``); returns its state (stage summaries)."""
        it = self.out / f"iter{k}"
        it.mkdir(parents=True, exist_ok=True)
        state = StageState(it / "state.json", OLD_STAGE_NAMES[self.cfg.feedback])
        policy = self.policy_of(k)
        prompts = self.prompts_of(k)
        run = self.stage_run(k, it, policy, prompts)
        logger.info("iteration %d: policy %s, %d prompts", k, policy, len(prompts))
        for i, stage in enumerate(self.stages):
            if not state.done(stage):
                started = time.time()
                if i < len(self.table):
                    summary = self._feedback_stage(k, run, self.table[i], self.table[i + 1 :])
                else:
                    run.models.keep(set())  # training and evaluation load their own models
                    summary = getattr(self, f"_stage_{stage}")(k, it, policy, prompts, state)
                state.finish(stage, summary, started)
                logger.info("iteration %d: %s done (%.1fs)", k, stage, time.time() - started)
            if stage == stop_after:
                return state.data
        write_manifest(
            it / "manifest.json",
            stage="loop_iteration",
            config=asdict(self.cfg),
            counts={s: state.get(s) for s in self.stages},
            started=time.time(),
            iteration=k,
            seconds=state.data.get("seconds", {}),
            policy=policy,
        )
        return state.data

    def _feedback_stage(self, k: int, run: StageRun, stage: Stage, later: tuple[Stage, ...]) -> dict[str, Any]:
        """A stage of the table, as the pipeline runs it; a round with too few pairs exports nothing."""
        if stage.name == "export" and len(run.read("balanced")) < self.cfg.min_pairs:
            n = len(run.read("balanced"))
            reason = (
                f"{n} balanced pairs < min_pairs {self.cfg.min_pairs}: no training this round, the start "
                f"policy carries on (see {run.work_dir}/state.json: pairs and balance; more prompts, more samples per "
                "prompt or a higher temperature give the labeler more differences to rank)"
            )
            logger.warning("iteration %d: %s", k + 1, reason)
            return {"skipped": reason, "pairs": n}
        return stage.brief(run_stage(run, stage, later))

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
            data=str(it / iteration_files(it, self.cfg.feedback)["dataset"]),
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
        bench = bench or self.cfg.selection
        metrics = evaluate_checkpoint(model_path, bench, out_dir, batch_size=self.cfg.batch_size)
        if self.truth is not None:  # e.g. a world's split: its checks beyond CHAIR, selectable
            metrics = {**metrics, **self.truth.metrics(bench, out_dir)}
        return metrics

    # ------------------------------------------------------------------ whole run
    def run(self) -> dict[str, Any]:
        """Every iteration (resuming), then the held-out table and the report."""
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.out / "loop_config.json", asdict(self.cfg))
        states = [self.iteration(k) for k in range(self.cfg.iterations)]
        bench = self.cfg.report_benchmark or self.cfg.selection
        policies = [("base", self.cfg.policy)] + [
            (f"iter{k}", st["done"]["select"]["policy"]) for k, st in enumerate(states, 1)
        ]
        table = []
        for k, (name, policy) in enumerate(policies):
            out_dir = self.out / "report_eval" / name
            row = {"iteration": k, "policy": policy, **self.evaluate(policy, out_dir, bench)}
            if self.truth is not None:  # e.g. a world's split: where the hallucinations come from, POPE
                row.update(self.truth.heldout(policy, bench, out_dir))
            table.append(row)
        from muffin.loop_report import write_report

        return write_report(self.out, self.cfg, states, table)


def iteration_files(it: Path, feedback: str) -> dict[str, str]:
    """The stage files of the iteration directory ``it``: ``FILES``, or where an older loop wrote there and nothing
    new exists (export's ``pairs.parquet``; the reward stage's ``checked.jsonl``), so that its run dirs resume."""
    files = dict(FILES)
    legacy = {"dataset": "pairs.parquet", **({"rewarded": "checked.jsonl"} if feedback == "reward" else {})}
    for name, old in legacy.items():
        if (it / old).exists() and not (it / FILES[name]).exists():
            files[name] = old
    return files


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


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Run K iterations of RLAIF-V (feedback, DPO, checkpoint selection).")
    p.add_argument("--config", required=True, help="loop configuration JSON (fields of muffin.loop.LoopConfig)")
    p.add_argument("--iterations", type=int, default=None, help="override the config's number of iterations")
    return p


def main(argv: Sequence[str] | None = None, *, truth: Callable[[LoopConfig], LoopTruth] | None = None) -> None:
    """The CLI; ``truth`` builds the ground-truth hook from the config (``muffin.world.demo run`` passes the world's)."""
    from utils.dist import setup_logging

    setup_logging()
    a = make_parser().parse_args(argv)
    cfg = LoopConfig.from_file(a.config)
    if a.iterations is not None:
        cfg.iterations = a.iterations
    if cfg.world and truth is None:
        raise SystemExit(
            f"error: {a.config} sets 'world' (a synthetic world's ground truth): run it with "
            f"python -m muffin.world.demo run --config {a.config}, which passes the world to the loop"
        )
    report = Loop(cfg, truth=truth(cfg) if truth else None).run()
    print(report["markdown"])


if __name__ == "__main__":
    main()
