"""The feedback stages as one table, run the same way by the pipeline CLI and the loop.

``stages_for(feedback)`` lists the ``Stage`` rows (name, output file, models it needs, ``run``); ``run_stages`` runs
them in order on a ``StageRun`` (config, work directory, prompts, the round's policy and seed, loaded models). Each
stage reads its inputs from the work directory (or the previous stage's records), resumes from its own output,
writes its manifest and returns its counts. A new stage: a ``run`` function here, a row in ``CLAIM_STAGES`` or
``REWARD_STAGES``, its knobs on ``muffin.feedback.config.FeedbackConfig``.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from muffin.decoding import CANDIDATE_SAMPLING
from muffin.feedback import autocheck, balance, changeq, divide, export, generate, pairs, report, reward_feedback
from muffin.feedback.config import FeedbackConfig
from muffin.feedback.stage import errors_path, finish_stage, read_errors, whole_file_fingerprint
from utils.dist import is_main
from utils.fingerprint import code_digest, family_identity
from utils.io import read_jsonl

logger = logging.getLogger(__name__)

# every stage's output in a work directory (the pipeline's --work-dir, the loop's iter<k>/)
FILES = {
    "answers": "answers.jsonl",
    "claims": "claims.jsonl",
    "questions": "questions.jsonl",
    "checked": "checked.jsonl",
    "rewarded": "rewarded.jsonl",
    "pairs": "pairs.jsonl",
    "balanced": "balanced.jsonl",
    "dataset": "dataset.parquet",
    "report": "report",
}


class GroundTruth(Protocol):
    """Known answers to the claims' questions (a synthetic world gives them: ``muffin.world.demo``): verdicts in the
    labeler's place (labeler ``oracle``), the labeler's accuracy (recorded in the autocheck counts) and what the
    balanced pairs teach about each kind of error (in the balance counts)."""

    def check(self, questions: list[dict[str, Any]], out_path: Path) -> list[dict[str, Any]]: ...

    def labeler_accuracy(self, checked: list[dict[str, Any]]) -> dict[str, Any]: ...

    def pair_signal(self, pairs: list[dict[str, Any]]) -> dict[str, Any]: ...


class Models:
    """The models a run has loaded, by key; ``keep`` drops those no later stage needs (one load per model)."""

    def __init__(self, cfg: FeedbackConfig) -> None:
        self.cfg = cfg
        self.held: dict[tuple, Any] = {}

    def vlm(self, path: str) -> Any:
        if ("vlm", path) not in self.held:
            from muffin.family import load_family

            c = self.cfg
            self.held["vlm", path] = load_family(
                path, dtype=c.dtype, device=c.device, trust_remote_code=c.trust_remote_code
            )
        return self.held["vlm", path]

    def text(self, path: str, server: str | None, cache: Path) -> tuple[Any, str]:
        """The divide / changeq model and the name its stage records (``muffin.feedback.served.text_model``), its
        requests cached in ``cache``."""
        if ("text", path, server) not in self.held:
            from muffin.feedback.served import text_model

            served = served_model(self.cfg, server, cache) if server else None
            self.held["text", path, server] = text_model(path, served, dtype=self.cfg.dtype, device=self.cfg.device,
                                                         cache=cache)  # fmt: skip
        return self.held["text", path, server]

    def keep(self, keys: set[tuple]) -> None:
        dropped = [k for k in self.held if k not in keys]
        for k in dropped:
            del self.held[k]
        if dropped:
            import torch

            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def load_run_prompts(cfg: FeedbackConfig, limit: int | None = None) -> tuple[list[Any], list[dict[str, Any]]]:
    """The run's valid prompts (the first ``limit``) and an error record per invalid line (``load_prompts``)."""
    from muffin.feedback.records import load_prompts

    return load_prompts(cfg.prompts, cfg.image_root, limit)


def served_model(cfg: FeedbackConfig, urls: str, cache: Path) -> Any:
    from muffin.feedback.served import ServedModel

    return ServedModel(urls, cache=cache, concurrency=cfg.server_concurrency)


@dataclass(kw_only=True)
class StageRun:
    """One run of the stages: the config, where the files go, the prompts, and what the orchestration decides (the
    loop: each round's policy and seed; the pipeline: ``cfg.policy`` and ``cfg.seed``)."""

    cfg: FeedbackConfig
    work_dir: Path
    prompts: list[Any]
    prompt_errors: list[dict[str, Any]] = field(default_factory=list)  # invalid prompt lines, recorded by generate
    policy: str = ""  # the answering policy (default cfg.policy)
    seed: int | None = None  # the run seed of sampling and pair draws (default cfg.seed)
    truth: GroundTruth | None = None
    overwrite: bool = False
    progress: bool = True
    manifest_config: dict[str, Any] | None = None  # what the whole-run manifests record (default: the config)
    files: dict[str, str] = field(default_factory=lambda: dict(FILES))  # each output's file name in work_dir
    models: Models | None = None
    counts: dict[str, Any] = field(default_factory=dict)  # each finished stage's counts, this process
    records: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # outputs made in this process

    def __post_init__(self) -> None:
        self.work_dir = Path(self.work_dir)
        self.policy = self.policy or self.cfg.policy
        self.seed = self.cfg.seed if self.seed is None else self.seed
        self.models = self.models or Models(self.cfg)
        if self.manifest_config is None:
            self.manifest_config = asdict(self.cfg)

    def path(self, name: str) -> Path:
        return self.work_dir / self.files[name]

    def read(self, name: str) -> list[dict[str, Any]]:
        """A stage's records: kept from this process, else read from its file."""
        if name not in self.records:
            self.records[name] = read_jsonl(self.path(name))
        return self.records[name]

    def resolve(self, which: str) -> str:
        """'initial' -> the run's first policy, 'policy' -> the answering policy, else ``which`` (a checkpoint)."""
        return {"initial": self.cfg.policy, "policy": self.policy}.get(which, which)

    @property
    def labeler_server(self) -> str | None:
        """The served labeler: ``labeler_server``, else the policy's servers when the policy labels itself."""
        self_feedback = self.cfg.labeler in ("initial", "policy")
        return self.cfg.labeler_server or (self.cfg.policy_server if self_feedback else None)


@dataclass(frozen=True)
class Stage:
    """One row of the table: the stage's name, the file it writes, the models it needs (keys of ``Models``) and
    the function that runs it; ``rank0``: a cheap whole-file stage that only rank 0 runs under torchrun."""

    name: str
    output: str
    run: Callable[[StageRun], dict[str, Any]]
    needs: Callable[[StageRun], set[tuple]] = lambda r: set()
    rank0: bool = False
    brief: Callable[[dict[str, Any]], dict[str, Any]] = lambda c: c  # the counts the loop keeps in its state


# ---------------------------------------------------------------------------------------------- model stages
def run_generate(run: StageRun) -> dict[str, Any]:
    cfg, t = run.cfg, time.time()
    gcfg = generate.GenerateConfig(
        num_samples=cfg.num_samples,
        seed=run.seed,
        batch_size=cfg.batch_size,
        decoding=CANDIDATE_SAMPLING.replace(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens),
        policy=Path(run.policy).name,
    )
    kw = dict(input_errors=run.prompt_errors, overwrite=run.overwrite, progress=run.progress)
    if cfg.policy_server:
        from muffin.feedback.generate import run_generate_served

        model = served_model(cfg, cfg.policy_server, run.path("answers").with_suffix(".requests.sqlite"))
        answers = run_generate_served(model, run.prompts, run.path("answers"), gcfg, **kw)
    else:
        policy = run.models.vlm(run.policy)
        model_id = family_identity(policy, path=run.policy)
        answers = generate.run_generate(policy, run.prompts, run.path("answers"), gcfg, model_id=model_id, **kw)
    run.records["answers"] = answers
    return finish_stage(run.path("answers"), stage="generate", config=run.manifest_config,
                        counts=generate.summarize(answers), started=t, inputs={"prompts": run.cfg.prompts})  # fmt: skip


def _generate_needs(run: StageRun) -> set[tuple]:
    return set() if run.cfg.policy_server else {("vlm", run.policy)}


def run_divide(run: StageRun) -> dict[str, Any]:
    cfg, t = run.cfg, time.time()
    dcfg = divide.DivideConfig(
        splitter=cfg.splitter,
        prompt_file=cfg.splitter_prompt_file,
        max_prompt_words=cfg.splitter_max_prompt_words,
        max_new_tokens=cfg.text_max_new_tokens,
        batch_size=cfg.batch_size,
    )
    lm, dcfg.splitter = run.models.text(cfg.splitter, cfg.splitter_server, run.path("claims").with_suffix(".requests.sqlite"))  # fmt: skip
    claims = divide.run_divide(run.read("answers"), run.path("claims"), dcfg, lm=lm, overwrite=run.overwrite,
                               progress=run.progress)  # fmt: skip
    run.records["claims"] = claims
    return finish_stage(run.path("claims"), stage="divide", config=asdict(dcfg), counts=divide.summarize(claims),
                        started=t, inputs={"answers": str(run.path("answers"))})  # fmt: skip


def run_changeq(run: StageRun) -> dict[str, Any]:
    cfg, t = run.cfg, time.time()
    qcfg = changeq.ChangeqConfig(
        changeq=cfg.changeq,
        prompt_file=cfg.changeq_prompt_file,
        max_new_tokens=cfg.text_max_new_tokens,
        batch_size=cfg.batch_size,
    )
    # one model for divide and changeq (the same checkpoint or servers) is loaded once: Models keeps it
    lm, qcfg.changeq = run.models.text(cfg.changeq, cfg.changeq_server, run.path("questions").with_suffix(".requests.sqlite"))  # fmt: skip
    questions = changeq.run_changeq(run.read("claims"), run.path("questions"), qcfg, lm=lm, overwrite=run.overwrite,
                                    progress=run.progress)  # fmt: skip
    run.records["questions"] = questions
    return finish_stage(run.path("questions"), stage="changeq", config=asdict(qcfg),
                        counts=changeq.summarize(questions), started=t, inputs={"claims": str(run.path("claims"))})  # fmt: skip


def run_autocheck(run: StageRun) -> dict[str, Any]:
    """The labeler (a checkpoint, a served model or the ground truth) answers every claim's question."""
    cfg, t, out = run.cfg, time.time(), run.path("checked")
    questions = run.read("questions")
    if cfg.labeler == "oracle":
        if run.truth is None:
            raise ValueError("labeler 'oracle' needs a world's ground truth; run the loop through "
                             "python -m muffin.world.demo run --config LOOP.json (or pass truth=)")  # fmt: skip
        checked = run.truth.check(questions, out)
        config: dict[str, Any] = {"labeler": "oracle"}
    else:
        labeler_path = run.resolve(cfg.labeler)
        acfg = autocheck.AutocheckConfig(labeler=Path(labeler_path).name, question_template=cfg.question_template,
                                         batch_size=cfg.labeler_batch_size, score=cfg.score)  # fmt: skip
        if run.labeler_server:
            from muffin.feedback.served import served_identity

            labeler = served_model(cfg, run.labeler_server, out.with_suffix(".requests.sqlite"))
            labeler.top_logprobs = cfg.labeler_top_logprobs
            model_id = served_identity(labeler)
        else:
            labeler = run.models.vlm(labeler_path)
            model_id = family_identity(labeler, path=labeler_path)
        checked = autocheck.run_autocheck(labeler, questions, run.prompts, out, acfg, model_id=model_id,
                                          overwrite=run.overwrite, progress=run.progress)  # fmt: skip
        config = {**asdict(acfg), "trust_remote_code": cfg.trust_remote_code}
    run.records["checked"] = checked
    counts = autocheck.summarize(checked)
    if run.truth is not None:
        counts["labeler_vs_ground_truth"] = run.truth.labeler_accuracy(checked)
    return finish_stage(out, stage="autocheck", config=config, counts=counts, started=t,
                        inputs={"questions": str(run.path("questions"))})  # fmt: skip


def _autocheck_needs(run: StageRun) -> set[tuple]:
    if run.cfg.labeler == "oracle" or run.labeler_server:
        return set()
    return {("vlm", run.resolve(run.cfg.labeler))}


def run_reward(run: StageRun) -> dict[str, Any]:
    """Reward-ranked feedback in place of divide / changeq / autocheck: every answer's self-feedback reward."""
    from muffin.reward import reward_for

    cfg, t = run.cfg, time.time()
    policy = run.models.vlm(run.policy) if _reward_needs(run) else None  # the aligned model is the policy
    reward = reward_for(policy, run.policy, cfg.reward_model and run.resolve(cfg.reward_model),
                        run.resolve(cfg.reward_reference), dtype=cfg.dtype, device=cfg.device,
                        batch_size=cfg.batch_size)  # fmt: skip
    rewarded = reward_feedback.run_rewards(reward, run.read("answers"), run.prompts, str(run.path("rewarded")),
                                           overwrite=run.overwrite, progress=run.progress)  # fmt: skip
    run.records["rewarded"] = rewarded
    n_scored = sum(1 for r in rewarded or [] if "reward_mean" in r)
    return finish_stage(run.path("rewarded"), stage="reward", config=run.manifest_config,
                        counts={"answers": len(rewarded or []), "rewarded": n_scored}, started=t,
                        inputs={"answers": str(run.path("answers"))})  # fmt: skip


def _reward_needs(run: StageRun) -> set[tuple]:
    aligned = run.cfg.reward_model and run.resolve(run.cfg.reward_model)
    return set() if run.cfg.policy_server or aligned not in (None, run.policy) else {("vlm", run.policy)}


# ---------------------------------------------------------------------------------------- whole-file stages
def run_pairs(run: StageRun) -> dict[str, Any]:
    cfg, t = run.cfg, time.time()
    checked, errors = run.read("checked"), []
    settings = {"max_pairs": cfg.max_pairs, "min_diff": cfg.min_diff, "seed": run.seed,
                "drop_zero_claims": cfg.drop_zero_claims}  # fmt: skip
    recs, stats = pairs.build_pairs(checked, errors=errors, **settings)
    pairs.write_jsonl(str(run.path("pairs")), recs)
    pairs.write_jsonl(str(errors_path(run.path("pairs"))), errors)
    run.records["pairs"] = recs
    fp = whole_file_fingerprint("pairs", inputs={"checked": checked}, settings=settings,
                                code=code_digest(pairs.build_pairs))  # fmt: skip
    return finish_stage(run.path("pairs"), stage="pairs", config=run.manifest_config, counts=stats, started=t,
                        inputs={"checked": str(run.path("checked"))}, fingerprint=fp)  # fmt: skip


def _brief_pairs(counts: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in counts.items() if k != "score_spread"}
    out["zero_claim_answers"] = len(counts.get("zero_claim_answers", []))
    return out


def run_reward_pairs(run: StageRun) -> dict[str, Any]:
    from muffin.reward import PairRules

    rules = PairRules(top_k=run.cfg.reward_top_k, max_word_gap=run.cfg.reward_max_word_gap)
    run.records["pairs"], counts = reward_feedback.write_pairs(run.read("rewarded"), str(run.path("pairs")), rules,
                                                               run.seed, time.time())  # fmt: skip
    return counts


def run_balance(run: StageRun) -> dict[str, Any]:
    t, recs = time.time(), run.read("pairs")
    if not run.cfg.balance:
        kept, stats, config = recs, {"pairs_out": len(recs), "balanced": False}, {"balance": False}
        fp = None
    else:
        kept, stats = balance.balance_pairs(recs)
        config = {"unit": "words"}
        fp = whole_file_fingerprint("balance", inputs={"pairs": recs}, settings=config,
                                    code=code_digest(balance.balance_pairs))  # fmt: skip
    pairs.write_jsonl(str(run.path("balanced")), kept)
    run.records["balanced"] = kept
    if run.truth is not None:
        stats = {**stats, "pairs_vs_ground_truth": run.truth.pair_signal(kept)}
    return finish_stage(run.path("balanced"), stage="balance", config=config, counts=stats, started=t,
                        inputs={"pairs": str(run.path("pairs"))}, fingerprint=fp)  # fmt: skip


def run_export(run: StageRun) -> dict[str, Any]:
    t, kept = time.time(), run.read("balanced")
    settings = {"ds_name": run.cfg.ds_name, "origin_dataset": Path(run.cfg.prompts).stem,
                "question_type": run.cfg.question_type}  # fmt: skip
    counts = export.run_export(kept, run.prompts, run.path("dataset"), **settings)
    return finish_stage(run.path("dataset").with_suffix(".jsonl"), stage="export", config=run.manifest_config,
                        counts=counts, started=t, inputs={"balanced": str(run.path("balanced"))},
                        fingerprint=export.export_fingerprint(kept, run.prompts, settings))  # fmt: skip


def run_report(run: StageRun) -> dict[str, Any]:
    """The data report (``report/``): the statistics users look at, with each stage's error count."""
    feedback = "rewarded" if run.cfg.feedback == "reward" else "checked"
    stages = ("answers", "rewarded") if feedback == "rewarded" else ("answers", "claims", "questions", "checked")
    errors = {name: len(read_errors(run.path(name))) for name in stages}
    stats = report.write_report(run.read(feedback), run.read("pairs"), run.read("balanced"), run.path("report"),
                                errors)  # fmt: skip
    stats["balance_r"] = (run.counts.get("balance") or {}).get("r")
    return stats


def _brief_balance(counts: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in counts.items() if k != "search"}


GENERATE = Stage("generate", "answers", run_generate, _generate_needs)
BALANCE = Stage("balance", "balanced", run_balance, rank0=True, brief=_brief_balance)
EXPORT = Stage("export", "dataset", run_export, rank0=True)
REPORT = Stage("report", "report", run_report, rank0=True)
CLAIM_STAGES = (
    GENERATE,
    Stage("divide", "claims", run_divide, lambda r: {("text", r.cfg.splitter, r.cfg.splitter_server)}),
    Stage("changeq", "questions", run_changeq, lambda r: {("text", r.cfg.changeq, r.cfg.changeq_server)}),
    Stage("autocheck", "checked", run_autocheck, _autocheck_needs),
    Stage("pairs", "pairs", run_pairs, rank0=True, brief=_brief_pairs),
    BALANCE,
    EXPORT,
    REPORT,
)
REWARD_STAGES = (
    GENERATE,
    Stage("reward", "rewarded", run_reward, _reward_needs),
    Stage("pairs", "pairs", run_reward_pairs, rank0=True),
    BALANCE,
    EXPORT,
    REPORT,
)
# old stage names still read from the loop's state files (iter<k>/state.json), by feedback
OLD_STAGE_NAMES = {"claims": {"conquer": "autocheck"}, "reward": {"conquer": "reward"}}


def stages_for(feedback: str) -> tuple[Stage, ...]:
    """The table of ``feedback`` ('claims' or 'reward')."""
    return REWARD_STAGES if feedback == "reward" else CLAIM_STAGES


def run_stage(run: StageRun, stage: Stage, later: Sequence[Stage] = ()) -> dict[str, Any] | None:
    """Run one stage (None on ranks other than 0 for a whole-file stage), then drop the models ``later`` stages do
    not need."""
    counts = stage.run(run) if is_main() or not stage.rank0 else None
    if counts is not None:
        run.counts[stage.name] = counts
    run.models.keep(set().union(*(s.needs(run) for s in later)))
    return counts


def run_stages(run: StageRun, stages: Sequence[Stage]) -> dict[str, Any]:
    """Every stage in order; returns the counts of each (on rank 0)."""
    for i, stage in enumerate(stages):
        if stage.rank0 and not is_main():
            break
        logger.info("stage %s", stage.name)
        run_stage(run, stage, stages[i + 1 :])
    return run.counts
