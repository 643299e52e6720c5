"""Run the whole feedback pipeline (generate, divide, changeq, autocheck, pairs, balance, export, report) at once.

    python -m muffin.feedback.pipeline --prompts prompts.jsonl --image-root DIR --policy CKPT --labeler CKPT \
        --work-dir work/iter1

Every stage writes its file into ``--work-dir`` (answers, claims, questions, checked, pairs, balanced .jsonl,
``dataset.parquet``, ``report/``) with a manifest and an errors file; rerunning the same command resumes. Omit
``--labeler`` for self-feedback (the policy labels its own answers). Under ``torchrun`` the model stages are
sharded across ranks and rank 0 does the cheap whole-file stages.
"""

from __future__ import annotations

import argparse
import gc
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from muffin.decoding import CANDIDATE_SAMPLING
from muffin.family import load_family
from muffin.feedback import autocheck, balance, changeq, divide, export, generate, pairs, report, reward_feedback
from muffin.feedback.records import load_prompts
from muffin.feedback.served import text_model
from muffin.feedback.stage import errors_path, finish_stage, read_errors, whole_file_fingerprint
from muffin.reward import PairRules
from utils.dist import device_for_rank, is_main, setup_logging
from utils.fingerprint import code_digest, family_identity

logger = logging.getLogger(__name__)

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


FEEDBACK = ("claims", "reward")


@dataclass
class PipelineConfig:
    """Everything one pipeline run needs; each field is also a ``--flag`` of the CLI."""

    prompts: str
    policy: str
    work_dir: str
    image_root: str | None = None
    labeler: str | None = None  # None: self-feedback with the policy
    splitter: str = "rule"
    split_prompt_file: str | None = None
    split_max_prompt_words: int | None = None
    changeq: str = "rule"
    changeq_prompt_file: str | None = None
    num_samples: int = 10
    temperature: float = CANDIDATE_SAMPLING.temperature
    max_new_tokens: int = CANDIDATE_SAMPLING.max_new_tokens
    text_max_new_tokens: int = 512
    seed: int = 0
    batch_size: int = 8
    labeler_batch_size: int = 0  # 0: 256 questions per pass where the labeler packs, else 16 (autocheck)
    question_template: str = "{question}"
    max_pairs: int = 2
    drop_zero_claims: bool = False
    ds_name: str = "RLAIF-V"
    question_type: str = "detailed_description"
    dtype: str | None = None
    device: str | None = None
    limit: int | None = None
    overwrite: bool = False  # start every stage over; without it a rerun resumes and refuses other settings
    # models behind OpenAI-compatible servers (comma-separated base URLs; docs/SERVING.md) instead of checkpoints
    policy_server: str | None = None  # --policy then only names the policy in the records
    labeler_server: str | None = None  # default with a policy server and no --labeler: the policy's servers
    splitter_server: str | None = None
    changeq_server: str | None = None
    server_concurrency: int = 16
    feedback: str = "claims"  # claims: divide-and-conquer (the paper); reward: reward-ranked (muffin.reward)
    reward_model: str | None = None  # reward-ranked: the aligned checkpoint (default: the policy)
    reward_reference: str | None = None  # reward-ranked: the checkpoint it was aligned from (required)
    reward_top_k: int = 3
    reward_max_word_gap: int = 25
    trust_remote_code: bool = False  # run code shipped with the policy/labeler checkpoints (opt-in; MiniCPM-V)

    def __post_init__(self) -> None:
        if self.feedback not in FEEDBACK:
            raise ValueError(f"unknown feedback '{self.feedback}'. Available: {', '.join(FEEDBACK)}")
        if self.feedback == "reward" and not self.reward_reference:
            raise ValueError(
                "--feedback reward needs --reward-reference (the checkpoint the reward model was aligned from)"
            )

    def path(self, name: str) -> Path:
        return Path(self.work_dir) / FILES[name]


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _served(cfg: PipelineConfig, urls: str, stage: str) -> Any:
    from muffin.feedback.served import ServedModel

    cache = cfg.path(stage).with_suffix(".requests.sqlite")
    return ServedModel(urls, cache=cache, concurrency=cfg.server_concurrency)


def run_pipeline(cfg: PipelineConfig, *, progress: bool = True) -> dict[str, Any] | None:
    """Run every stage in order (each resumes from its output); returns the report statistics on rank 0."""
    started = time.time()
    cfg.device = cfg.device or device_for_rank()
    Path(cfg.work_dir).mkdir(parents=True, exist_ok=True)
    prompts, bad = load_prompts(cfg.prompts, cfg.image_root, cfg.limit)
    policy_name = Path(cfg.policy).name
    labeler_path = cfg.labeler or cfg.policy

    t = time.time()
    policy = (
        None
        if cfg.policy_server
        else load_family(cfg.policy, dtype=cfg.dtype, device=cfg.device, trust_remote_code=cfg.trust_remote_code)
    )
    gcfg = generate.GenerateConfig(
        cfg.num_samples,
        cfg.seed,
        cfg.batch_size,
        CANDIDATE_SAMPLING.replace(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens),
        policy_name,
    )
    if policy is None:
        from muffin.feedback.served import run_generate_served

        answers = run_generate_served(_served(cfg, cfg.policy_server, "answers"), prompts, cfg.path("answers"), gcfg,
                                      input_errors=bad, overwrite=cfg.overwrite, progress=progress)  # fmt: skip
    else:
        answers = generate.run_generate(
            policy,
            prompts,
            cfg.path("answers"),
            gcfg,
            input_errors=bad,
            model_id=family_identity(policy, path=cfg.policy),
            overwrite=cfg.overwrite,
            progress=progress,
        )
    finish_stage(
        cfg.path("answers"),
        stage="generate",
        config=asdict(cfg),
        counts=generate.summarize(answers),
        started=t,
        inputs={"prompts": cfg.prompts},
    )
    if cfg.feedback == "reward":
        rewarded = _reward_stage(cfg, prompts, answers, policy, progress)
        del policy
        _free()
        return _finish_rank0(cfg, prompts, rewarded, started) if is_main() else None
    labeler_server = cfg.labeler_server or (cfg.policy_server if cfg.labeler is None else None)
    labeler = policy if labeler_path == cfg.policy and policy is not None else None  # self-feedback: kept loaded
    del policy
    _free()

    t = time.time()
    dcfg = divide.DivideConfig(
        cfg.splitter, cfg.split_prompt_file, cfg.split_max_prompt_words, cfg.text_max_new_tokens, cfg.batch_size
    )
    served = _served(cfg, cfg.splitter_server, "claims") if cfg.splitter_server else None
    lm, dcfg.splitter = text_model(cfg.splitter, served, dtype=cfg.dtype, device=cfg.device)
    claims = divide.run_divide(answers, cfg.path("claims"), dcfg, lm=lm, overwrite=cfg.overwrite, progress=progress)
    finish_stage(
        cfg.path("claims"),
        stage="divide",
        config=asdict(dcfg),
        counts=divide.summarize(claims),
        started=t,
        inputs={"answers": str(cfg.path("answers"))},
    )

    t = time.time()
    qcfg = changeq.ChangeqConfig(cfg.changeq, cfg.changeq_prompt_file, cfg.text_max_new_tokens, cfg.batch_size)
    if cfg.changeq == cfg.splitter and cfg.changeq_server == cfg.splitter_server:  # one model for both: loaded once
        qcfg.changeq = dcfg.splitter
    else:
        lm = None
        _free()
        served = _served(cfg, cfg.changeq_server, "questions") if cfg.changeq_server else None
        lm, qcfg.changeq = text_model(cfg.changeq, served, dtype=cfg.dtype, device=cfg.device)
    questions = changeq.run_changeq(
        claims, cfg.path("questions"), qcfg, lm=lm, overwrite=cfg.overwrite, progress=progress
    )
    finish_stage(
        cfg.path("questions"),
        stage="changeq",
        config=asdict(qcfg),
        counts=changeq.summarize(questions),
        started=t,
        inputs={"claims": str(cfg.path("claims"))},
    )
    del lm
    _free()

    t = time.time()
    labeler_id = None
    if labeler_server is not None:
        from muffin.feedback.served import served_identity

        labeler = _served(cfg, labeler_server, "checked")
        labeler_id = served_identity(labeler)
    elif labeler is None:
        labeler = load_family(
            labeler_path, dtype=cfg.dtype, device=cfg.device, trust_remote_code=cfg.trust_remote_code
        )
    acfg = autocheck.AutocheckConfig(Path(labeler_path).name, cfg.question_template, cfg.labeler_batch_size)
    checked = autocheck.run_autocheck(
        labeler,
        questions,
        prompts,
        cfg.path("checked"),
        acfg,
        model_id=labeler_id or family_identity(labeler, path=labeler_path),
        overwrite=cfg.overwrite,
        progress=progress,
    )
    finish_stage(
        cfg.path("checked"),
        stage="autocheck",
        config=asdict(acfg),
        counts=autocheck.summarize(checked),
        started=t,
        inputs={"questions": str(cfg.path("questions"))},
    )
    del labeler
    _free()
    if not is_main():
        return None
    return _finish_rank0(cfg, prompts, checked, started)


def _reward_stage(cfg: PipelineConfig, prompts: list, answers: list, policy: Any, progress: bool) -> list | None:
    """Reward-ranked feedback in place of divide / changeq / autocheck: every answer's self-feedback reward."""
    from muffin.reward import reward_for

    t = time.time()
    reward = reward_for(policy, cfg.policy, cfg.reward_model, cfg.reward_reference, dtype=cfg.dtype, device=cfg.device,
                        batch_size=cfg.batch_size)  # fmt: skip
    rewarded = reward_feedback.run_rewards(
        reward, answers, prompts, str(cfg.path("rewarded")), overwrite=cfg.overwrite, progress=progress
    )
    finish_stage(
        cfg.path("rewarded"),
        stage="reward",
        config=asdict(cfg),
        counts={"answers": len(rewarded or [])},
        started=t,
        inputs={"answers": str(cfg.path("answers"))},
    )
    return rewarded


def _finish_rank0(cfg: PipelineConfig, prompts: list, checked: list[dict[str, Any]], started: float) -> dict[str, Any]:
    t = time.time()
    if cfg.feedback == "reward":
        rules = PairRules(top_k=cfg.reward_top_k, max_word_gap=cfg.reward_max_word_gap)
        pair_recs = reward_feedback.write_pairs(checked, str(cfg.path("pairs")), rules, cfg.seed, t)
    else:
        pair_recs = _claim_pairs(cfg, checked, t)
    return _balance_export_report(cfg, prompts, checked, pair_recs, started)


def _claim_pairs(cfg: PipelineConfig, checked: list[dict[str, Any]], t: float) -> list[dict[str, Any]]:
    pair_errors: list[dict[str, Any]] = []
    pair_recs, pstats = pairs.build_pairs(
        checked, max_pairs=cfg.max_pairs, seed=cfg.seed, drop_zero_claims=cfg.drop_zero_claims, errors=pair_errors
    )
    pairs.write_jsonl(str(cfg.path("pairs")), pair_recs)
    pairs.write_jsonl(str(errors_path(cfg.path("pairs"))), pair_errors)
    finish_stage(
        cfg.path("pairs"),
        stage="pairs",
        config=asdict(cfg),
        counts=pstats,
        started=t,
        inputs={"checked": str(cfg.path("checked"))},
        fingerprint=whole_file_fingerprint(
            "pairs",
            inputs={"checked": checked},
            settings={"max_pairs": cfg.max_pairs, "seed": cfg.seed, "drop_zero_claims": cfg.drop_zero_claims},
            code=code_digest(pairs.build_pairs),
        ),
    )
    return pair_recs


def _balance_export_report(
    cfg: PipelineConfig, prompts: list, checked: list[dict[str, Any]], pair_recs: list, started: float
) -> dict[str, Any]:
    t = time.time()
    kept, bstats = balance.balance_pairs(pair_recs)
    pairs.write_jsonl(str(cfg.path("balanced")), kept)
    finish_stage(
        cfg.path("balanced"),
        stage="balance",
        config={"unit": "words"},
        counts=bstats,
        started=t,
        inputs={"pairs": str(cfg.path("pairs"))},
        fingerprint=whole_file_fingerprint(
            "balance", inputs={"pairs": pair_recs}, settings={"unit": "words"}, code=code_digest(balance.balance_pairs)
        ),
    )
    t = time.time()
    ecounts = export.run_export(
        kept,
        prompts,
        cfg.path("dataset"),
        ds_name=cfg.ds_name,
        origin_dataset=Path(cfg.prompts).stem,
        question_type=cfg.question_type,
    )
    finish_stage(
        cfg.path("dataset").with_suffix(".jsonl"),
        stage="export",
        config=asdict(cfg),
        counts=ecounts,
        started=t,
        inputs={"balanced": str(cfg.path("balanced"))},
        fingerprint=export.export_fingerprint(
            kept,
            prompts,
            {"ds_name": cfg.ds_name, "origin_dataset": Path(cfg.prompts).stem, "question_type": cfg.question_type},
        ),
    )
    stages = ("answers", "rewarded") if cfg.feedback == "reward" else ("answers", "claims", "questions", "checked")
    errors = {name: len(read_errors(cfg.path(name))) for name in stages}
    stats = report.write_report(checked, pair_recs, kept, cfg.path("report"), errors)
    stats["balance_r"] = bstats["r"]
    logger.info(
        "pipeline done in %.1fs: %d pairs, %d after balancing, %d rows in %s",
        time.time() - started,
        len(pair_recs),
        len(kept),
        ecounts["rows"],
        cfg.path("dataset"),
    )
    return stats


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Run the RLAIF-V feedback data pipeline end to end.")
    defaults = PipelineConfig("", "", "")
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        required = name in ("prompts", "policy", "work_dir")
        if isinstance(value, bool):
            p.add_argument(flag, action="store_true")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            p.add_argument(flag, type=type(value), default=value)
        elif name in ("split_max_prompt_words", "limit"):
            p.add_argument(flag, type=int, default=None)
        else:
            p.add_argument(flag, required=required, default=None if required else value)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = make_parser().parse_args(argv)
    setup_logging()
    stats = run_pipeline(PipelineConfig(**vars(args)))
    if stats is not None:
        print(report.to_markdown(stats))


if __name__ == "__main__":
    main()
