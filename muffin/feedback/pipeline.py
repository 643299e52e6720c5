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
from muffin.feedback import autocheck, balance, changeq, divide, export, generate, pairs, report
from muffin.feedback.llm import ChatLM
from muffin.feedback.records import load_prompts
from muffin.feedback.stage import errors_path, finish_stage, read_errors, whole_file_fingerprint
from utils.dist import device_for_rank, is_main, setup_logging
from utils.fingerprint import code_digest, family_identity

logger = logging.getLogger(__name__)

FILES = {
    "answers": "answers.jsonl",
    "claims": "claims.jsonl",
    "questions": "questions.jsonl",
    "checked": "checked.jsonl",
    "pairs": "pairs.jsonl",
    "balanced": "balanced.jsonl",
    "dataset": "dataset.parquet",
    "report": "report",
}


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
    trust_remote_code: bool = False  # run code shipped with the policy/labeler checkpoints (opt-in; MiniCPM-V)

    def path(self, name: str) -> Path:
        return Path(self.work_dir) / FILES[name]


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _text_lm(cfg: PipelineConfig, path: str) -> ChatLM | None:
    return None if path == "rule" else ChatLM.from_pretrained(path, dtype=cfg.dtype, device=cfg.device)


def run_pipeline(cfg: PipelineConfig, *, progress: bool = True) -> dict[str, Any] | None:
    """Run every stage in order (each resumes from its output); returns the report statistics on rank 0."""
    started = time.time()
    cfg.device = cfg.device or device_for_rank()
    Path(cfg.work_dir).mkdir(parents=True, exist_ok=True)
    prompts, bad = load_prompts(cfg.prompts, cfg.image_root, cfg.limit)
    policy_name = Path(cfg.policy).name
    labeler_path = cfg.labeler or cfg.policy

    t = time.time()
    policy = load_family(cfg.policy, dtype=cfg.dtype, device=cfg.device, trust_remote_code=cfg.trust_remote_code)
    gcfg = generate.GenerateConfig(
        cfg.num_samples,
        cfg.seed,
        cfg.batch_size,
        CANDIDATE_SAMPLING.replace(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens),
        policy_name,
    )
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
    labeler = policy if labeler_path == cfg.policy else None  # self-feedback keeps the policy loaded
    del policy
    _free()

    t = time.time()
    dcfg = divide.DivideConfig(
        cfg.splitter, cfg.split_prompt_file, cfg.split_max_prompt_words, cfg.text_max_new_tokens, cfg.batch_size
    )
    lm = _text_lm(cfg, cfg.splitter)
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
    if cfg.changeq != cfg.splitter:  # one checkpoint for both steps is loaded once
        lm = None
        _free()
        lm = _text_lm(cfg, cfg.changeq)
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
    if labeler is None:
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
        model_id=family_identity(labeler, path=labeler_path),
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


def _finish_rank0(cfg: PipelineConfig, prompts: list, checked: list[dict[str, Any]], started: float) -> dict[str, Any]:
    t = time.time()
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
    errors = {name: len(read_errors(cfg.path(name))) for name in ("answers", "claims", "questions", "checked")}
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
