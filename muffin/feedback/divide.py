"""Stage 2, divide: split each answer into atomic claims, with an instruction-tuned LM or offline rules.

    python -m muffin.feedback.divide --answers work/answers.jsonl --out work/claims.jsonl --splitter rule
    python -m muffin.feedback.divide --answers work/answers.jsonl --out work/claims.jsonl \
        --splitter CKPT --prompt-file split_facts.txt --max-prompt-words 300

With a model, the prompt template gets ``{question}`` and ``{answer}``; the reply must hold a ``### Facts:`` bullet
list (parsed by ``parsers.parse_bullets``). A reply with no list is recorded as unparseable in the errors file.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from muffin.feedback.llm import complete_texts, requests_made
from muffin.feedback.parsers import FACTS_HEADER, dedupe, parse_bullets
from muffin.feedback.rules import split_claims_rule
from muffin.feedback.served import add_server_args, served_from_args, text_model
from muffin.feedback.stage import (
    add_overwrite_arg,
    add_runtime_args,
    finish_stage,
    load_records,
    run_record_stage,
)
from utils.chat_lm import ChatLM
from utils.chat_lm.prompts import fill_template, load_prompt
from utils.dist import device_for_rank, setup_logging
from utils.fetch import file_or_name
from utils.fingerprint import code_digest, sha256_bytes

logger = logging.getLogger(__name__)

DEFAULT_SPLIT_TEMPLATE = """Below are a question about an image and an answer to it. List every fact that the \
answer states about the image, each rewritten as a short sentence that can be checked on its own: name the object \
instead of writing "it" or "they", one fact per sentence, and leave out opinions, feelings and advice.

Question: {question}
Answer: {answer}

Reply with the line "### Facts:" followed by one fact per line, each line starting with "- "."""


@dataclass
class DivideConfig:
    """How answers are split: ``splitter`` is ``"rule"``, a local chat-LM checkpoint directory or a served model's
    name (the model itself is passed to ``run_divide``)."""

    splitter: str = "rule"
    prompt_file: str | None = None
    max_prompt_words: int | None = None  # 300 for the released Llama-3-8B split model
    max_new_tokens: int = 512
    batch_size: int = 8


def truncate_words(text: str, max_words: int | None) -> str:
    """The first ``max_words`` space-separated words (the released split model saw prompts cut to 300)."""
    if not max_words:
        return text
    words = text.split(" ")
    return text if len(words) <= max_words else " ".join(words[:max_words])


def split_prompt(template: str, question: str, answer: str, max_words: int | None = None) -> str:
    """The filled split prompt, cut to ``max_words`` space-separated words when given."""
    filled = fill_template(template, {"question": question, "answer": answer}, where="of the splitter (--prompt-file)")
    return truncate_words(filled, max_words)


def parse_facts(raw: str) -> list[str] | None:
    """Claims in a split model's reply (duplicates dropped), or None when the reply has no list."""
    items = parse_bullets(raw, FACTS_HEADER)
    return None if items is None else dedupe(items)


def make_processor(cfg: DivideConfig, lm: ChatLM | None) -> Callable[[list[dict[str, Any]]], list[tuple]]:
    """The batch function for ``run_record_stage``: rules, or the LM plus the bullet parser."""
    if lm is None:
        return lambda recs: [({"claims": split_claims_rule(r["answer"])}, None) for r in recs]
    template, _ = load_prompt(cfg.prompt_file, DEFAULT_SPLIT_TEMPLATE)

    def process(recs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], str | None]]:
        prompts = [split_prompt(template, r["question"], r["answer"], cfg.max_prompt_words) for r in recs]
        out = []
        for raw, fault in complete_texts(lm, prompts, max_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size):
            if fault is not None:  # this prompt alone got no text (over the context, a failed request)
                out.append(({"claims": None}, fault))
                continue
            claims = parse_facts(raw)
            if claims is None:
                out.append(
                    (
                        {"claims": None, "divide_raw": raw},
                        "unparseable splitter output: no '### Facts:' header and no bullet list",
                    )
                )
            else:
                out.append(({"claims": claims}, None))
        return out

    return process


def divide_fingerprint(cfg: DivideConfig, lm: ChatLM | None) -> dict[str, Any]:
    """The splitter (rules, or the model's identity with the template's text and the prompt/answer limits) and
    the code; batch size and device are left out."""
    from muffin.feedback import parsers, rules

    model = None
    if lm is not None:
        model = {
            **lm.identity(),
            "template_sha256": sha256_bytes(load_prompt(cfg.prompt_file, DEFAULT_SPLIT_TEMPLATE)[0].encode()),
            "max_prompt_words": cfg.max_prompt_words,
            "max_new_tokens": cfg.max_new_tokens,
        }
    return {
        "stage": "divide",
        "splitter": "rule" if lm is None else model,
        "code": code_digest(run_divide, rules, parsers, *([] if lm is None else [complete_texts, type(lm)])),
    }


def run_divide(
    answers: Sequence[dict[str, Any]],
    out_path: str | Path,
    cfg: DivideConfig,
    *,
    lm: ChatLM | None = None,
    overwrite: bool = False,
    wait: bool = True,
    progress: bool = True,
) -> list[dict[str, Any]] | None:
    """Add ``claims`` (list of sentences) to every answer record; resumable, sharded by rank; an output made with
    another ``divide_fingerprint`` is refused unless ``overwrite``."""
    if cfg.splitter != "rule" and lm is None:
        raise ValueError(
            f"splitter '{cfg.splitter}' is a model: pass lm=muffin.feedback.served.text_model('{cfg.splitter}')[0]"
        )
    return run_record_stage(
        answers,
        out_path,
        "divide",
        make_processor(cfg, lm),
        batch_size=cfg.batch_size,
        requires={"question": "text", "answer": "text"},
        made_by="generate",
        fingerprint=divide_fingerprint(cfg, lm),
        overwrite=overwrite,
        wait=wait,
        progress=progress,
    )


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in records if not r.get("error")]
    n_claims = [len(r["claims"]) for r in ok]
    return {
        "answers": len(records),
        "answers_ok": len(ok),
        "unparseable": sum(1 for r in records if (r.get("error") or {}).get("stage") == "divide"),
        "claims": sum(n_claims),
        "zero_claim_answers": sum(1 for n in n_claims if n == 0),
        "mean_claims_per_answer": round(sum(n_claims) / max(1, len(ok)), 3),
    }


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Split each answer into atomic claims.")
    p.add_argument("--answers", required=True, help="generate stage output")
    p.add_argument("--out", required=True, help="claims JSONL; a rerun resumes it (errors in <out>.errors.jsonl)")
    p.add_argument("--splitter", default="rule",
                   help="'rule' (offline) or a local chat-LM checkpoint directory (or --splitter-server)")  # fmt: skip
    p.add_argument(
        "--prompt-file",
        type=file_or_name,
        default=None,
        help="prompt template with {question} and {answer} (default: ours; the released model's: prompt-split-facts, see python -m utils.fetch)",
    )
    p.add_argument(
        "--max-prompt-words",
        type=int,
        default=None,
        help="cut the filled prompt to N words (300 for the released split model)",
    )
    p.add_argument("--max-new-tokens", type=int, default=512,
                   help="longest reply the splitter may write; a reply cut short usually fails to parse")  # fmt: skip
    add_runtime_args(p, batch_size=8)
    add_overwrite_arg(p)
    add_server_args(p, "splitter")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = make_parser().parse_args(argv)
    setup_logging()
    started = time.time()
    cfg = DivideConfig(args.splitter, args.prompt_file, args.max_prompt_words, args.max_new_tokens, args.batch_size)
    served = served_from_args(args, "splitter", args.out) if args.splitter_server is not None else None
    cache = args.server_cache or f"{args.out}.requests.sqlite"
    lm, cfg.splitter = text_model(cfg.splitter, served, dtype=args.dtype, device=args.device or device_for_rank(),
                                  cache=cache)  # fmt: skip
    recs = run_divide(
        load_records(args.answers, "answers"), args.out, cfg, lm=lm, overwrite=args.overwrite, wait=not args.no_wait
    )
    if recs is not None:
        counts = finish_stage(
            args.out,
            stage="divide",
            config={**asdict(cfg), **requests_made(lm)},
            counts=summarize(recs),
            started=started,
            inputs={"answers": args.answers},
        )
        print(f"divide: {counts}")


if __name__ == "__main__":
    main()
