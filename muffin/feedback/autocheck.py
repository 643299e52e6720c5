"""Stage 4, conquer (autocheck): the labeler VLM answers every claim's yes/no question with the image.

    python -m muffin.feedback.autocheck --questions work/questions.jsonl --prompts prompts.jsonl \
        --image-root DIR --labeler CKPT --out work/checked.jsonl

A claim is judged true iff P(yes)+P(Yes) > P(no)+P(No) for the first answer token (RLAIF-V sec. 3.1); the answer
score is -(number of claims judged false). Work is sharded by prompt: the image is decoded once and only the
questions of that image fill its batches; a question asked by several answers of one prompt is scored once. The
labeler may be the policy itself (self-feedback, as for RLAIF-V 12B).
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from muffin.family import TRUST_REMOTE_CODE_HELP, ModelFamily, Sample, load_family
from muffin.feedback.records import Prompt, check_keys, field_problem, load_prompts, prompts_by_id
from muffin.feedback.served import ServedModel, add_server_args, served_from_args, served_identity, served_yes_no_probs
from muffin.feedback.stage import (
    KEY,
    ShardedOutput,
    add_model_args,
    add_overwrite_arg,
    add_runtime_args,
    finish_stage,
    load_records,
)
from muffin.inference import yes_no_probs
from utils.chat_lm.prompts import fill_template
from utils.dist import device_for_rank, setup_logging, shard
from utils.faults import call_per_record
from utils.fingerprint import code_digest, family_identity, model_identity, sha256_json

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class AutocheckConfig:
    """Labeler read-out settings; ``question_template`` wraps each question (``{question}`` slot)."""

    labeler: str = ""
    question_template: str = "{question}"
    batch_size: int = 0  # questions per forward pass; 0: PACKED_BATCH where the labeler packs, else PLAIN_BATCH
    score: str = "count"  # "count": RLAIF-V's -(claims judged false); "expected": -(sum of P(no) / (P(yes) + P(no)))

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise ValueError(f"unknown answer score '{self.score}'. Available: {', '.join(SCORES)}")


# Packed, the questions of several prompts (each image once, its questions behind it) share one pass: 320 questions
# per pass ran 1.26x faster than 80 for a 7B labeler on an H200 (script/bench/bench_inference.py, 2026-11-30).
# The plain path pads every question to its image's length and builds full logits, so it takes fewer at a time.
PACKED_BATCH, PLAIN_BATCH = 256, 16


def effective_batch_size(labeler: Any, batch_size: int) -> int:
    from muffin.fast.packing import supports_packing

    if batch_size > 0:
        return batch_size
    if isinstance(labeler, ServedModel):  # one request per question: a batch only bounds what is in flight
        return PACKED_BATCH
    return PACKED_BATCH if supports_packing(labeler) else PLAIN_BATCH


def judge(p_yes: Sequence[float], p_no: Sequence[float]) -> list[bool]:
    """Claim verdicts: True (claim holds) iff P(yes) > P(no); a tie counts as false."""
    return [y > n for y, n in zip(p_yes, p_no)]


def answer_score(verdicts: Sequence[bool]) -> int:
    """RLAIF-V's answer score: minus the number of claims judged false (0 for an answer with no claims)."""
    return -sum(1 for v in verdicts if not v)


def expected_score(p_yes: Sequence[float], p_no: Sequence[float]) -> float:
    """Minus the expected number of false claims under the read-out, sum of P(no) / (P(yes) + P(no)) (a claim with
    P(yes) = P(no) = 0 counts as false, as ``judge`` does). Not the paper's score: a claim the labeler is unsure of
    moves it by about 1/2 instead of 0 or 1 (``AutocheckConfig.score = "expected"``; pair it with a ``min_diff``)."""
    return -round(sum(n / (y + n) if y + n > 0 else 1.0 for y, n in zip(p_yes, p_no)), 6)


SCORES = ("count", "expected")


def group_by_prompt(records: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Records grouped by ``prompt_id``, groups in order of first appearance, records in input order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:  # a record without prompt_id (it failed a field check) is a group of its own
        groups.setdefault(r.get("prompt_id", f"<no prompt_id: {r.get(KEY)}>"), []).append(r)
    return list(groups.values())


@dataclass
class _Group:
    """One prompt's pending records with its image (or the reason it has none) and its unique questions."""

    recs: list[dict[str, Any]]
    reason: str | None
    samples: list[Sample]
    unique: list[str]


def _prepare_group(prompt: Prompt | None, recs: list[dict[str, Any]], cfg: AutocheckConfig) -> _Group:
    live = [r for r in recs if not r.get("error")]
    image, reason = None, None
    if live and any(r["questions"] for r in live):
        if prompt is None:
            reason = f"prompt '{recs[0]['prompt_id']}' is not in the --prompts file; pass the generate stage's input"
        else:
            try:
                image = prompt.load_image()
            except (OSError, ValueError) as e:
                reason = f"image unreadable: {e}"
    unique = list(dict.fromkeys(q for r in live for q in r["questions"])) if reason is None else []
    samples = [
        Sample(image, fill_template(cfg.question_template, {"question": q}, where="--question-template"))
        for q in unique
    ]
    return _Group(recs, reason, samples, unique)


def _write_group(group: _Group, probs: dict[str, Any], cfg: AutocheckConfig, out) -> None:
    """Write a prompt's records; ``probs`` maps each question to (P(yes), P(no)) or to the fault that question
    alone raised (a question over the labeler's context), which fails the records that ask it."""
    for r in group.recs:
        fault = next((probs[q] for q in r.get("questions") or [] if isinstance(probs.get(q), dict)), None)
        if r.get("error"):
            out.write(r)
        elif group.reason is not None:
            out.error(r[KEY], "autocheck", group.reason)
            out.write({**r, "error": {"stage": "autocheck", "reason": group.reason}})
        elif fault is not None:
            out.error(r[KEY], "autocheck", fault["reason"], **{k: v for k, v in fault.items() if k != "reason"})
            out.write({**r, "error": {"stage": "autocheck", **fault}})
        else:
            p_yes = [probs[q][0] for q in r["questions"]]
            p_no = [probs[q][1] for q in r["questions"]]
            verdicts = judge(p_yes, p_no)
            out.write(
                {
                    **r,
                    "p_yes": p_yes,
                    "p_no": p_no,
                    "verdicts": verdicts,
                    "n_false": -answer_score(verdicts),
                    "score": answer_score(verdicts) if cfg.score == "count" else expected_score(p_yes, p_no),
                    "labeler": cfg.labeler,
                }
            )


def _check_groups(labeler: ModelFamily, groups: list[_Group], cfg: AutocheckConfig, out, batch_size: int) -> None:
    """Score several prompts' questions in one ``yes_no_probs`` call (each image stays one packed group), then
    write each prompt's records. If the call fails on a record fault, each question is scored alone
    (``call_per_record``): the records asking a failing question go to the errors file, the others are written."""
    flat = [s for g in groups for s in g.samples]
    if isinstance(labeler, ServedModel):  # the labeler behind a server: first-token top logprobs, cached requests

        def probe(ss: Sequence[Sample]) -> list:
            return served_yes_no_probs(labeler, list(ss), top_logprobs=getattr(labeler, "top_logprobs", 20))
    else:

        def probe(ss: Sequence[Sample]) -> list:
            return yes_no_probs(labeler, list(ss), batch_size=batch_size)

    scores = [res if fault is None else fault for res, fault in call_per_record(probe, flat)]
    i = 0
    for g in groups:
        _write_group(g, dict(zip(g.unique, scores[i : i + len(g.samples)])), cfg, out)
        i += len(g.samples)


def _checked_fields(rec: dict[str, Any], out: ShardedOutput) -> dict[str, Any]:
    """``rec``, or ``rec`` marked failed (and logged in the errors file) when its fields are damaged."""
    if rec.get("error"):
        return rec
    problem = field_problem(rec, {"prompt_id": "text", "questions": "texts"}, "changeq")
    if problem is None:
        return rec
    reason = f"record '{rec[KEY]}': {problem}"
    if rec[KEY] not in out.done:
        out.error(rec[KEY], "autocheck", reason)
    return {**rec, "error": {"stage": "autocheck", "reason": reason}}


def autocheck_fingerprint(labeler: Any, cfg: AutocheckConfig, model_id: dict[str, Any] | None = None) -> dict:
    """The labeler (weights, LoRA, dtype) and the name written into every record, the question template, the score,
    and the code; batch size and device are left out."""
    from muffin import inference

    return {
        "stage": "autocheck",
        "labeler": model_id or family_identity(labeler),
        "labeler_name": cfg.labeler,
        "question_template": cfg.question_template,
        "score": cfg.score,
        "code": code_digest(run_autocheck, inference, type(labeler)),
    }


def question_inputs(questions: Sequence[dict[str, Any]], prompts: dict[str, Prompt]) -> dict[str, str]:
    """answer id -> sha256 of the questions record and of its prompt's image bytes (the image decides the
    verdicts: a replaced image means new verdicts)."""
    out = {}
    for r in questions:
        prompt = prompts.get(r.get("prompt_id"))
        out[r[KEY]] = sha256_json({"record": r, "image": prompt.image_sha256() if prompt else None})
    return out


def run_autocheck(
    labeler: ModelFamily,
    questions: Sequence[dict[str, Any]],
    prompts: Sequence[Prompt],
    out_path: str | Path,
    cfg: AutocheckConfig,
    *,
    model_id: dict[str, Any] | None = None,
    overwrite: bool = False,
    wait: bool = True,
    progress: bool = True,
) -> list[dict[str, Any]] | None:
    """Score every question of this rank's prompts; add ``p_yes``, ``p_no``, ``verdicts``, ``n_false``, ``score``.

    Prompts are scored together until their questions fill a batch (``cfg.batch_size``; images are loaded for one
    batch at a time), so the labeler's passes stay full when prompts have few questions; results are written per
    prompt after each batch, and a rerun resumes after the last prompt written. An output made with another
    ``autocheck_fingerprint`` is refused unless ``overwrite``; a record whose questions or image changed is
    checked again."""
    check_keys(questions, out_path)
    by_id = prompts_by_id(list(prompts))
    out = ShardedOutput(
        out_path,
        fingerprint=autocheck_fingerprint(labeler, cfg, model_id),
        inputs=question_inputs(questions, by_id),
        overwrite=overwrite,
    )
    questions = [_checked_fields(r, out) for r in questions]
    groups = [g for g in shard(group_by_prompt(questions)) if any(r[KEY] not in out.done for r in g)]
    logger.info("autocheck: %d prompts to check on this rank (%d answers already done)", len(groups), len(out.done))
    batch_size = effective_batch_size(labeler, cfg.batch_size)
    pending: list[_Group] = []
    for group in tqdm(groups, desc="autocheck", disable=not progress):
        recs = [r for r in group if r[KEY] not in out.done]
        pending.append(_prepare_group(by_id.get(group[0]["prompt_id"]), recs, cfg))
        if sum(len(g.samples) for g in pending) >= batch_size:
            _check_groups(labeler, pending, cfg, out, batch_size)
            pending = []
    _check_groups(labeler, pending, cfg, out, batch_size)
    return out.finalize([r[KEY] for r in questions], wait=wait)


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in records if not r.get("error")]
    n_claims = sum(len(r["verdicts"]) for r in ok)
    n_false = sum(r["n_false"] for r in ok)
    return {
        "answers": len(records),
        "answers_checked": len(ok),
        "claims": n_claims,
        "claims_false": n_false,
        "share_false": round(n_false / n_claims, 4) if n_claims else None,
        "image_errors": sum(1 for r in records if (r.get("error") or {}).get("stage") == "autocheck"),
    }


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Score every claim's yes/no question with the labeler VLM.")
    p.add_argument("--questions", required=True, help="changeq stage output")
    p.add_argument("--prompts", required=True, help="the generate stage's input JSONL (for the images)")
    p.add_argument("--image-root", default=None, help="directory that relative image_path values start from")
    add_model_args(p, "labeler", "the labeler VLM (may be the policy itself: self-feedback)", required=False)
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_REMOTE_CODE_HELP)
    p.add_argument("--labeler-name", default=None, help="name recorded in the data (default: checkpoint dir name)")
    p.add_argument(
        "--question-template", default="{question}", help="wraps each question, e.g. '{question} Answer yes or no.'"
    )
    p.add_argument(
        "--score",
        default="count",
        choices=SCORES,
        help="answer score: count (RLAIF-V: -claims judged false) or expected (-sum of P(no) / (P(yes) + P(no)))",
    )
    p.add_argument("--out", required=True)
    add_runtime_args(p, batch_size=0, batch_help="questions per forward pass; 0: 256 where the labeler packs, else 16")
    add_overwrite_arg(p)
    add_server_args(p, "labeler")
    p.add_argument("--top-logprobs", type=int, default=20, help="served labeler: first-token alternatives read")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = make_parser().parse_args(argv)
    setup_logging()
    started = time.time()
    prompts, _ = load_prompts(args.prompts, args.image_root)
    if (args.labeler is None) == (args.labeler_server is None):
        raise SystemExit("error: give the labeler as a checkpoint (--labeler DIR) or a server (--labeler-server URL)")
    if args.labeler_server is not None:  # the labeler behind a server: first-token top logprobs
        labeler = served_from_args(args, "labeler", args.out)
        labeler.top_logprobs = args.top_logprobs
        name, batch_size = labeler.model, args.batch_size
        model_id = {**served_identity(labeler), "top_logprobs": args.top_logprobs}
        described = labeler.identity()
    else:
        labeler = load_family(
            args.labeler,
            family=args.labeler_family,
            dtype=args.dtype,
            device=args.device or device_for_rank(),
            lora_path=args.labeler_lora,
            trust_remote_code=args.trust_remote_code,
        )
        name, batch_size = Path(args.labeler).name, args.batch_size
        model_id = model_identity(
            args.labeler, lora=args.labeler_lora, family=labeler.name, dtype=next(labeler.model.parameters()).dtype
        )
        described = {
            "labeler_path": args.labeler,
            "labeler_lora": args.labeler_lora,
            "trust_remote_code": args.trust_remote_code,
        }
    cfg = AutocheckConfig(labeler=args.labeler_name or name, question_template=args.question_template,
                          batch_size=batch_size, score=args.score)  # fmt: skip
    recs = run_autocheck(
        labeler,
        load_records(args.questions, "questions"),
        prompts,
        args.out,
        cfg,
        model_id=model_id,
        overwrite=args.overwrite,
        wait=not args.no_wait,
    )
    if recs is not None:
        config = {**asdict(cfg), **described}
        if args.labeler_server is not None:
            config["requests"] = labeler.stats.as_dict()
        counts = finish_stage(
            args.out,
            stage="autocheck",
            config=config,
            counts=summarize(recs),
            started=started,
            inputs={"questions": args.questions, "prompts": args.prompts},
        )
        print(f"autocheck: {counts}")


if __name__ == "__main__":
    main()
