"""Stage 3, change question: turn every claim into a yes/no question, in the claims' order.

    python -m muffin.feedback.changeq --claims work/claims.jsonl --out work/questions.jsonl --changeq rule
    python -m muffin.feedback.changeq --claims work/claims.jsonl --out work/questions.jsonl \
        --changeq CKPT --prompt-file change_question.txt

With a model, all claims of one answer go into one prompt (each as ``"\\n- {claim}\\n"``, as the released changeq
model was trained) and the reply's ``### Modified sentences:`` list must have one question per claim: a count
mismatch is recorded as an error for that answer, never truncated or padded.
"""

from __future__ import annotations

import argparse
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from muffin.feedback.llm import complete_texts, requests_made
from muffin.feedback.parsers import QUESTIONS_HEADER, parse_bullets
from muffin.feedback.rules import claim_to_question_rule
from muffin.feedback.served import add_server_args, served_from_args, text_model
from muffin.feedback.stage import (
    add_overwrite_arg,
    add_runtime_args,
    finish_stage,
    load_records,
    run_record_stage,
)
from utils.chat_lm import ChatLM
from utils.chat_lm.prompts import load_prompt
from utils.dist import device_for_rank, setup_logging
from utils.fetch import file_or_name
from utils.fingerprint import code_digest, sha256_bytes

logger = logging.getLogger(__name__)

DEFAULT_CHANGEQ_TEMPLATE = """Rewrite each statement below as a yes/no question about the image, one question per \
statement and in the same order. Keep the tense and the details, add nothing, and keep every "not", "no" or other \
negation.

Reply with the line "### Modified sentences:" followed by one question per line, each line starting with "- ".

### Statements:{facts}"""

# The published template ends with a descriptive slot `{facts, each as "\n- {fact}\n"}`; ours uses `{facts}`.
_FACTS_SLOT = re.compile(r"\{facts\}|\{facts,[^\n]*\}\s*$")


def changeq_prompt(template: str, claims: Sequence[str]) -> str:
    """Fill the template's facts slot with ``"\\n- {claim}\\n"`` per claim (appended when there is no slot)."""
    block = "".join(f"\n- {c}\n" for c in claims)
    m = _FACTS_SLOT.search(template)
    if m is None:
        return template + block
    return template[: m.start()] + block + template[m.end() :]


def parse_questions(raw: str, n_claims: int) -> tuple[list[str] | None, str | None]:
    """(questions, error): the reply's question list, and an error when it is unparseable or its count differs."""
    items = parse_bullets(raw, QUESTIONS_HEADER)
    if items is None:
        return None, "unparseable change-question output: no '### Modified sentences:' header and no bullet list"
    if len(items) != n_claims:
        return items, f"count mismatch: {n_claims} claims but {len(items)} questions"
    return items, None


@dataclass
class ChangeqConfig:
    """``changeq`` is ``"rule"``, a local chat-LM checkpoint directory or a served model's name (the model itself is
    passed to ``run_changeq``)."""

    changeq: str = "rule"
    prompt_file: str | None = None
    max_new_tokens: int = 512
    batch_size: int = 8


def make_processor(cfg: ChangeqConfig, lm: ChatLM | None) -> Callable[[list[dict[str, Any]]], list[tuple]]:
    if lm is None:
        return lambda recs: [({"questions": [claim_to_question_rule(c) for c in r["claims"]]}, None) for r in recs]
    template, _ = load_prompt(cfg.prompt_file, DEFAULT_CHANGEQ_TEMPLATE)

    def process(recs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], str | None]]:
        asked = [r for r in recs if r["claims"]]  # no claims: no question, no model call
        prompts = [changeq_prompt(template, r["claims"]) for r in asked]
        # a prompt that gets no text (over the context, a failed request) fails its record alone
        raws = complete_texts(lm, prompts, max_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
        faults = {r["answer_id"]: f for r, (_, f) in zip(asked, raws) if f is not None}
        raws = [raw for raw, _ in raws]
        by_id = dict(zip((r["answer_id"] for r in asked), raws))
        out = []
        for r in recs:
            if r["answer_id"] in faults:
                out.append(({"questions": None}, faults[r["answer_id"]]))
                continue
            if r["answer_id"] not in by_id:
                out.append(({"questions": []}, None))
                continue
            questions, err = parse_questions(by_id[r["answer_id"]], len(r["claims"]))
            fields: dict[str, Any] = {"questions": None if err else questions}
            if err:
                fields["changeq_raw"] = by_id[r["answer_id"]]
            out.append((fields, err))
        return out

    return process


def changeq_fingerprint(cfg: ChangeqConfig, lm: ChatLM | None) -> dict[str, Any]:
    """The question writer (rules, or the model's identity with the template's text and answer limit) and the
    code; batch size and device are left out."""
    from muffin.feedback import parsers, rules

    model = None
    if lm is not None:
        model = {
            **lm.identity(),
            "template_sha256": sha256_bytes(load_prompt(cfg.prompt_file, DEFAULT_CHANGEQ_TEMPLATE)[0].encode()),
            "max_new_tokens": cfg.max_new_tokens,
        }
    return {
        "stage": "changeq",
        "changeq": "rule" if lm is None else model,
        "code": code_digest(run_changeq, rules, parsers, *([] if lm is None else [complete_texts, type(lm)])),
    }


def run_changeq(
    claims: Sequence[dict[str, Any]],
    out_path: str | Path,
    cfg: ChangeqConfig,
    *,
    lm: ChatLM | None = None,
    overwrite: bool = False,
    wait: bool = True,
    progress: bool = True,
) -> list[dict[str, Any]] | None:
    """Add ``questions`` (one per claim, same order) to every claims record; resumable, sharded by rank; an output
    made with another ``changeq_fingerprint`` is refused unless ``overwrite``."""
    if cfg.changeq != "rule" and lm is None:
        raise ValueError(
            f"changeq '{cfg.changeq}' is a model: pass lm=muffin.feedback.served.text_model('{cfg.changeq}')[0]"
        )
    return run_record_stage(
        claims,
        out_path,
        "changeq",
        make_processor(cfg, lm),
        batch_size=cfg.batch_size,
        requires={"claims": "texts"},
        made_by="divide",
        fingerprint=changeq_fingerprint(cfg, lm),
        overwrite=overwrite,
        wait=wait,
        progress=progress,
    )


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in records if not r.get("error")]
    errs = [r["error"]["reason"] for r in records if (r.get("error") or {}).get("stage") == "changeq"]
    return {
        "answers": len(records),
        "answers_ok": len(ok),
        "questions": sum(len(r["questions"]) for r in ok),
        "count_mismatch": sum(1 for e in errs if e.startswith("count mismatch")),
        "unparseable": sum(1 for e in errs if e.startswith("unparseable")),
    }


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Turn each claim into a yes/no question.")
    p.add_argument("--claims", required=True, help="divide stage output")
    p.add_argument("--out", required=True, help="questions JSONL; a rerun resumes it (errors in <out>.errors.jsonl)")
    p.add_argument("--changeq", default="rule",
                   help="'rule' (offline) or a local chat-LM checkpoint directory (or --changeq-server)")  # fmt: skip
    p.add_argument(
        "--prompt-file",
        type=file_or_name,
        default=None,
        help="prompt template with a {facts} slot (default: ours; the released model's: prompt-change-question, see python -m utils.fetch)",
    )
    p.add_argument("--max-new-tokens", type=int, default=512,
                   help="longest reply the question writer may write; a reply cut short usually fails to parse")  # fmt: skip
    add_runtime_args(p, batch_size=8)
    add_overwrite_arg(p)
    add_server_args(p, "changeq")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = make_parser().parse_args(argv)
    setup_logging()
    started = time.time()
    cfg = ChangeqConfig(args.changeq, args.prompt_file, args.max_new_tokens, args.batch_size)
    served = served_from_args(args, "changeq", args.out) if args.changeq_server is not None else None
    cache = args.server_cache or f"{args.out}.requests.sqlite"
    lm, cfg.changeq = text_model(cfg.changeq, served, dtype=args.dtype, device=args.device or device_for_rank(),
                                 cache=cache)  # fmt: skip
    recs = run_changeq(
        load_records(args.claims, "claims"), args.out, cfg, lm=lm, overwrite=args.overwrite, wait=not args.no_wait
    )
    if recs is not None:
        counts = finish_stage(
            args.out,
            stage="changeq",
            config={**asdict(cfg), **requests_made(lm)},
            counts=summarize(recs),
            started=started,
            inputs={"claims": args.claims},
        )
        print(f"changeq: {counts}")


if __name__ == "__main__":
    main()
