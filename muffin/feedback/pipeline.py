"""Run the whole feedback pipeline (the stage table of ``muffin.feedback.stages``) at once.

    python -m muffin.feedback.pipeline --prompts prompts.jsonl --image-root DIR --policy CKPT --labeler CKPT \
        --work-dir work/iter1

Every stage writes its file into ``--work-dir`` (answers, claims, questions, checked, pairs, balanced .jsonl,
``dataset.parquet``, ``report/``) with a manifest and an errors file; rerunning the same command resumes. Without
``--labeler`` the policy labels its own answers (self-feedback). Under ``torchrun`` the model stages are sharded
across ranks and rank 0 does the cheap whole-file stages. Every knob is a ``FeedbackConfig`` field.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from muffin.feedback import report
from muffin.feedback.config import RENAMED, FeedbackConfig, knob
from muffin.feedback.stages import FILES, StageRun, load_run_prompts, run_stages, stages_for
from utils.dist import device_for_rank, is_main, setup_logging

logger = logging.getLogger(__name__)

__all__ = ["FILES", "PipelineConfig", "run_pipeline", "make_parser", "main"]


@dataclass(kw_only=True)
class PipelineConfig(FeedbackConfig):
    """The stage knobs (``FeedbackConfig``) plus where one pipeline run reads and writes."""

    work_dir: str = knob(MISSING, "directory of every stage's output, manifest and errors file (a rerun resumes)")
    limit: int | None = knob(None, "use only the first N valid prompts")
    overwrite: bool = knob(False, "start every stage over; without it a rerun resumes and refuses other settings")

    def path(self, name: str) -> Path:
        return Path(self.work_dir) / FILES[name]


def run_pipeline(cfg: PipelineConfig, *, progress: bool = True) -> dict[str, Any] | None:
    """Run every stage in order (each resumes from its output); returns the report statistics on rank 0."""
    started = time.time()
    cfg.device = cfg.device or device_for_rank()
    Path(cfg.work_dir).mkdir(parents=True, exist_ok=True)
    prompts, bad = load_run_prompts(cfg, cfg.limit)
    run = StageRun(cfg=cfg, work_dir=Path(cfg.work_dir), prompts=prompts, prompt_errors=bad,
                   overwrite=cfg.overwrite, progress=progress)  # fmt: skip
    counts = run_stages(run, stages_for(cfg.feedback))
    if not is_main():
        return None
    logger.info(
        "pipeline done in %.1fs: %d pairs, %d after balancing, %d rows in %s",
        time.time() - started,
        counts["pairs"]["pairs"],
        counts["balance"]["pairs_out"],
        counts["export"]["rows"],
        cfg.path("dataset"),
    )
    return counts["report"]


class _Renamed(argparse.Action):
    """An old flag: sets the new one's value, with a deprecation warning."""

    def __call__(self, parser: argparse.ArgumentParser, ns: argparse.Namespace, value: Any, opt: str | None = None):
        logger.warning("%s is deprecated: use --%s", opt, self.dest.replace("_", "-"))
        setattr(ns, self.dest, value)


def make_parser() -> argparse.ArgumentParser:
    """One flag per ``PipelineConfig`` field (``--num-samples`` for ``num_samples``), with its help text."""
    p = argparse.ArgumentParser(description="Run the RLAIF-V feedback data pipeline end to end.")
    old_of = {new: old for old, new in RENAMED.items()}
    for f in fields(PipelineConfig):
        flag, help_ = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if f.default is MISSING:
            p.add_argument(flag, required=True, help=help_)
            continue
        if f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_)
            continue
        kind = {"int": int, "int | None": int, "float": float}.get(str(f.type), str)
        shown = "" if f.default is None else f" (default: {f.default})"
        p.add_argument(flag, type=kind, default=f.default, help=help_ + shown)
        if f.name in old_of:
            p.add_argument("--" + old_of[f.name].replace("_", "-"), dest=f.name, type=kind, action=_Renamed,
                           help=argparse.SUPPRESS)  # fmt: skip
    return p


def main(argv: Sequence[str] | None = None) -> None:
    setup_logging()
    args = make_parser().parse_args(argv)
    stats = run_pipeline(PipelineConfig(**vars(args)))
    if stats is not None:
        print(report.to_markdown(stats))


if __name__ == "__main__":
    main()
