"""Object HalBench: CHAIR of detailed image descriptions against COCO ground truth, with judge or rule extraction.

    python -m eval.objhal --answers outputs/objhal/answers.jsonl \\
        --annotations coco2014/annotations/instances_val2014.json coco2014/annotations/instances_train2014.json \\
        --captions coco2014/annotations/captions_val2014.json coco2014/annotations/captions_train2014.json \\
        --synonyms synonyms_refine.txt --prompt-file objhal_object_extraction.txt \\
        --judge openai --judge-model gpt-3.5-turbo-0125 --out-dir outputs/objhal

``--protocol paper`` (default) counts as the published script does (``eval.chair_paper``; the published table and
prompt: ``python -m utils.fetch objhal-synonyms`` / ``prompt-objhal-extraction``); ``--protocol ours`` uses our
table, lenient parsing and de-duplicated mentions (``eval.chair``) under other metric names. Answers: JSONL (or a
JSON list) of ``{"id", "image_id", "question", "answer"}``. Outputs ``samples.jsonl`` and ``results.json``.
"""

from __future__ import annotations

import argparse
import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eval import nlp
from eval.chair import (
    RuleExtractor,
    chair_summary,
    load_ground_truth,
    load_synonyms,
    sample_detail,
    unique_mentions,
)
from eval.chair_paper import (
    SHORT_ANSWER_WORDS,
    PaperChair,
    format_paper_summary,
    paper_detail,
    paper_summary,
    strip_answer,
)
from eval.judges import Judge, JudgeRequest, add_judge_args, build_judge
from eval.parsers import parse_object_list, parse_object_list_paper
from eval.prompts import OBJHAL_EXTRACTION
from eval.scoring import (
    SampleStore,
    add_rerun_args,
    ask_and_parse,
    chunks,
    failure_fields,
    fmt,
    guard_out_dir,
    load_records,
    write_results,
)
from utils.chat_lm.prompts import fill_template, load_prompt
from utils.fetch import file_or_name

logger = logging.getLogger(__name__)

EXTRACTION_MAX_TOKENS = 512  # the published Chat default
PAPER_TEMPERATURE = 0.2  # the published extraction request's temperature (gpt4_grpc.Chat default)
PAPER_REASKS = 99  # the published fail_limit: 100 attempts per answer
PROTOCOLS = ("paper", "ours")


def normalize_answers(answers: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``{id, image_id, question, answer}`` per record; a record that lacks a field gets ``error`` instead.

    As the published loader: ``prompt`` is read before ``question`` and ``text`` before ``answer``."""
    out, seen = [], set()
    for n, rec in enumerate(answers):
        key = rec.get("id", rec.get("question_id", rec.get("image_id")))
        item: dict[str, Any] = {
            "id": key if key is not None else f"record-{n}",
            "question": rec["prompt"] if "prompt" in rec else rec.get("question", ""),
        }
        if key is not None and key in seen:  # keep the first answer; the repeat is reported, not silently merged
            item["id"] = f"{key}#duplicate-{n}"
            item["error"] = f"record {n} repeats id {key!r}; give every answer its own 'id'"
        seen.add(key)
        answer = rec["text"] if "text" in rec else rec.get("answer")  # the published loader's precedence
        image_id = _image_id(rec.get("image_id", rec.get("image") if isinstance(rec.get("image"), int) else None))
        if "error" in item:
            pass
        elif key is None:
            item["error"] = f"record {n} has no 'id' or 'image_id'; add the COCO image id of the answered image"
        elif image_id is None:
            item["error"] = f"record {n} (id {key!r}) has no integer 'image_id'; add the COCO image id"
        elif not isinstance(answer, str):
            why = f" (answer stage: {rec['error']})" if rec.get("error") else "; rerun the answer stage"
            item["error"] = f"record {n} (id {key!r}) has no string 'answer' (or 'text'){why}"
        item.update(image_id=image_id, answer=answer)
        out.append(item)
    return out


def _image_id(value: Any) -> int | None:
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        m = re.search(r"(\d+)(?:\.\w+)?$", value)  # "123", "COCO_val2014_000000000123.jpg"
        return int(m.group(1)) if m else None
    return None


def evaluate_objhal(
    answers: Sequence[dict[str, Any]],
    annotations_path: str | Path | Sequence[str | Path],
    *,
    protocol: str = "paper",
    synonyms_path: str | Path | None = None,
    extractor: str | Judge = "rule",
    captions_path: str | Path | Sequence[str | Path] | None = None,
    prompt: str | None = None,
    out_dir: str | Path | None = None,
    reasks: int | None = None,
    chunk_size: int = 64,
    extra_config: dict[str, Any] | None = None,
    max_tokens: int = EXTRACTION_MAX_TOKENS,
) -> dict[str, Any]:
    """Score answers with CHAIR; returns ``{"metrics": ..., "samples": [...]}``.

    Args:
        answers: records with ``id`` (optional), ``image_id``, ``question`` (or ``prompt``), ``answer``.
        annotations_path: COCO-format instances file(s) giving the ground-truth objects.
        protocol: ``"paper"``: the published counting (``chair_paper.paper_summary``: ``response_hall``,
            ``object_hall``, ...); needs the published synonym table and, with a judge, the published prompt.
            ``"ours"``: our table and counting (``chair.chair_summary``: ``response_hallucination``, ``chair_i``).
        synonyms_path: synonym table; for ``ours`` the default is our COCO table (with its stop phrases).
        extractor: ``"rule"`` (offline word matching) or a judge that lists the objects.
        captions_path: COCO caption file(s) whose objects are added to the ground truth.
        prompt: the judge's extraction template with ``{question}``/``{answer}`` slots.
        out_dir: when given, per-sample records go to ``samples.jsonl`` there (resumable) and ``results.json``.
        reasks: re-asks after an unparseable object list (default: the published 99 for ``paper``, 2 for ``ours``).
        extra_config: more entries for the results JSON's ``config`` (e.g. the prompt's source).
        max_tokens: the judge's answer budget.

    Example:
        >>> res = evaluate_objhal(answers, "instances.json", synonyms_path="synonyms_refine.txt")  # doctest: +SKIP
        >>> res["metrics"]["response_hall"], res["metrics"]["object_hall"]  # doctest: +SKIP
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol '{protocol}'; pass one of {PROTOCOLS}")
    paper = protocol == "paper"
    if reasks is None:
        reasks = PAPER_REASKS if paper else 2
    started = time.time()
    items = normalize_answers(answers)
    ann = _paths(annotations_path)
    caps = _paths(captions_path)
    image_ids = [i["image_id"] for i in items if i.get("image_id") is not None]
    if paper:
        if synonyms_path is None:
            raise ValueError(
                "the paper protocol needs the published synonym table: fetch it with "
                "`python -m utils.fetch objhal-synonyms` and pass it as --synonyms (or use --protocol ours)"
            )
        if not isinstance(extractor, str) and prompt is None:
            raise ValueError(
                "the paper protocol needs the published extraction prompt: fetch it with "
                "`python -m utils.fetch prompt-objhal-extraction` and pass it as --prompt-file (or use --protocol ours)"
            )
        scorer: Any = PaperChair.from_table(synonyms_path)
        truth = scorer.ground_truth(ann, caps, image_ids)
        empty = sorted(i for i, objs in truth.items() if not objs)
        if empty:
            logger.warning("%d images have no ground-truth object (ids %s...)", len(empty), empty[:5])
        source = scorer.source
    else:
        table = load_synonyms(synonyms_path)
        scorer = RuleExtractor.for_table(table, coco_rules=synonyms_path is None)
        truth = load_ground_truth(ann, table, captions=caps, extractor=scorer, image_ids=image_ids)
        for it in items:
            if "error" not in it and it["image_id"] not in truth:
                it["error"] = f"image_id {it['image_id']} (id {it['id']!r}) is not in {', '.join(map(str, ann))}"
        source = table.source
    store = SampleStore(Path(out_dir) / "samples.jsonl") if out_dir is not None else None
    done = {} if store is None else {k: r for k, r in store.records.items() if store.is_done(k)}
    todo = [it for it in items if it["id"] not in done]
    results = dict(done)
    template = prompt or OBJHAL_EXTRACTION
    for part in chunks(todo, chunk_size):
        if paper:
            recs = _score_chunk_paper(part, truth, scorer, extractor, template, reasks, max_tokens)
        else:
            recs = _score_chunk(part, truth, scorer, extractor, template, reasks, max_tokens)
        for rec in recs:
            results[rec["id"]] = rec
            if store is not None:
                store.write(rec)
    if store is not None:
        store.close()
    samples = [results[it["id"]] for it in items if it["id"] in results]
    scored = [s for s in samples if "error" not in s]
    summary = paper_summary(scored) if paper else chair_summary(scored)
    metrics = {**summary, "n_records": len(items), "n_errors": len(samples) - len(scored)}
    out = {"metrics": metrics, "samples": samples, "protocol": protocol}
    if out_dir is not None:
        judge = None if isinstance(extractor, str) else extractor
        config = {
            "protocol": protocol,
            "annotations": [str(a) for a in ann],
            "captions": [str(c) for c in caps],
            "synonyms": source,
            "extractor": "rule" if judge is None else "judge",
            "reasks": reasks,
            "temperature": PAPER_TEMPERATURE if paper else 0.0,
            "max_tokens": max_tokens,
            **(extra_config or {}),
        }
        write_results(
            out_dir,
            benchmark="objhal",
            metrics=metrics,
            config=config,
            judge=judge,
            started=started,
            nlp=nlp.resources() if paper else {"lemmatizer": "ours: eval.chair.singularize", "tagger": None},
        )
    return out


def _paths(value: str | Path | Sequence[str | Path] | None) -> list[str | Path]:
    if value is None:
        return []
    return [value] if isinstance(value, str | Path) else list(value)


def _score_chunk_paper(
    part: Sequence[dict[str, Any]],
    truth: dict[int, set[str]],
    chair: PaperChair,
    extractor: str | Judge,
    template: str,
    reasks: int,
    max_tokens: int,
) -> list[dict[str, Any]]:
    """The published counting: the answer without "Assistant:", a judge call at temperature 0.2 with the
    filled prompt as the only (system) message for answers of more than 3 words, re-asked until its reply
    parses; objects through ``PaperChair``."""
    ok = [{**it, "answer": strip_answer(it["answer"])} for it in part if "error" not in it]
    objects: dict[Any, tuple[Any, Any, int]] = {}
    if not isinstance(extractor, str):
        ask = [it for it in ok if len(it["answer"].strip().split()) > SHORT_ANSWER_WORDS]
        reqs = [
            JudgeRequest.chat(
                system=fill_template(
                    template, {"question": it["question"], "answer": it["answer"]}, [], where="extraction prompt"
                ),
                temperature=PAPER_TEMPERATURE,
                max_tokens=max_tokens,
            )
            for it in ask
        ]
        parsed = ask_and_parse(extractor, reqs, parse_object_list_paper, reasks=reasks)
        objects = {it["id"]: res for it, res in zip(ask, parsed)}
    elif extractor != "rule":
        raise ValueError(f"unknown extractor '{extractor}'; pass 'rule' or a judge object")
    recs: list[dict[str, Any]] = []
    by_id = {it["id"]: it for it in ok}
    for it in part:
        base = {"id": it["id"], "image_id": it.get("image_id"), "question": it["question"], "answer": it["answer"]}
        if "error" in it:
            recs.append({**base, "error": it["error"]})
            continue
        answer = by_id[it["id"]]["answer"]
        extra: dict[str, Any] = {}
        if isinstance(extractor, str):
            mentions = chair.caption_mentions(answer)
        elif it["id"] not in objects:  # a short answer: no judge call, no objects
            mentions, extra = [], {"judge_objects": []}
        else:
            value, resp, attempts = objects[it["id"]]
            if value is None:
                recs.append({**base, **failure_fields(resp, attempts, "object list")})
                continue
            words = chair.judge_object_words(value)
            mentions = chair.coco_words(words)
            extra = {"judge_objects": value, "object_words": words, "attempts": attempts}
        recs.append({**base, **paper_detail(mentions, truth[it["image_id"]], answer), **extra})
    return recs


def _score_chunk(
    part: Sequence[dict[str, Any]],
    truth: dict[int, set[str]],
    rules: RuleExtractor,
    extractor: str | Judge,
    template: str,
    reasks: int,
    max_tokens: int,
) -> list[dict[str, Any]]:
    recs: list[dict[str, Any]] = []
    ok = [it for it in part if "error" not in it]
    names: dict[Any, Any] = {}
    if not isinstance(extractor, str):
        ask = [it for it in ok if len(it["answer"].split()) > SHORT_ANSWER_WORDS]
        reqs = [
            JudgeRequest.chat(
                system=fill_template(
                    template,
                    {"question": it["question"], "answer": it["answer"]},
                    [],
                    where="objhal extraction prompt",
                ),
                temperature=0.0,
                max_tokens=max_tokens,
            )
            for it in ask
        ]
        for it, (parsed, resp, attempts) in zip(ask, ask_and_parse(extractor, reqs, parse_object_list, reasks=reasks)):
            names[it["id"]] = (parsed, resp, attempts)
    elif extractor != "rule":
        raise ValueError(f"unknown extractor '{extractor}'; pass 'rule' or a judge object")
    for it in part:
        base = {"id": it["id"], "image_id": it.get("image_id"), "question": it["question"], "answer": it["answer"]}
        if "error" in it:
            recs.append({**base, "error": it["error"]})
            continue
        if isinstance(extractor, str) or it["id"] not in names:
            mentions = rules.mentions(it["answer"]) if isinstance(extractor, str) else []
            extracted = None
        else:
            parsed, resp, attempts = names[it["id"]]
            if parsed is None:
                recs.append({**base, **failure_fields(resp, attempts, "object list")})
                continue
            mentions, extracted = rules.classes_of_names(parsed), parsed
        detail = sample_detail(unique_mentions(mentions), truth[it["image_id"]], len(it["answer"].split()))
        recs.append({**base, **detail, **({"judge_objects": extracted} if extracted is not None else {})})
    return recs


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Object HalBench (CHAIR) of a model's answers.")
    p.add_argument("--answers", required=True, help="answers JSONL / JSON list: id, image_id, question, answer")
    p.add_argument("--annotations", nargs="+", required=True, help="COCO-format instances file(s)")
    p.add_argument("--captions", nargs="*", default=[], help="COCO caption file(s) adding ground-truth objects")
    p.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="paper",
        help="paper: count as the published script (its table, NLTK/spaCy words, metrics response_hall / "
        "object_hall), comparable with the paper; ours: our table, lenient parsing, de-duplicated mentions",
    )
    p.add_argument(
        "--synonyms",
        type=file_or_name,
        default=None,
        help="synonym table, one class per line; paper: the published table (python -m utils.fetch "
        "objhal-synonyms); ours: default our COCO table",
    )
    p.add_argument(
        "--extractor",
        choices=["rule", "judge"],
        default="judge",
        help="judge: a judge lists the objects (the published protocol); rule: offline word matching",
    )
    p.add_argument(
        "--prompt-file",
        type=file_or_name,
        default=None,
        help="extraction prompt with {question}/{answer} slots; paper: the published prompt "
        "(python -m utils.fetch prompt-objhal-extraction); ours: default our prompt",
    )
    p.add_argument(
        "--reasks",
        type=int,
        default=None,
        help="re-asks of the judge after an unparseable object list (default: paper 99, as the published "
        "100 attempts; ours 2)",
    )
    p.add_argument("--out-dir", required=True, help="writes samples.jsonl and results.json here")
    add_judge_args(p)
    add_rerun_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    from utils.dist import setup_logging

    setup_logging()
    args = make_parser().parse_args(argv)
    if args.protocol == "paper" and args.extractor == "judge" and args.prompt_file is None:
        raise SystemExit(
            "--protocol paper needs the published extraction prompt: fetch it with "
            "`python -m utils.fetch prompt-objhal-extraction` and pass --prompt-file (or use --protocol ours)"
        )
    prompt, prompt_source = load_prompt(args.prompt_file, OBJHAL_EXTRACTION)
    extractor = build_judge(args, Path(args.out_dir) / "judge_cache.sqlite") if args.extractor == "judge" else "rule"
    guard_out_dir(args, None if extractor == "rule" else extractor, benchmark="objhal")  # docs/RESUMING.md
    res = evaluate_objhal(
        load_records(args.answers),
        args.annotations,
        protocol=args.protocol,
        synonyms_path=args.synonyms,
        extractor=extractor,
        captions_path=args.captions or None,
        prompt=prompt,
        out_dir=args.out_dir,
        reasks=args.reasks,
        extra_config={"prompt": prompt_source, "answers": str(args.answers)},
        max_tokens=args.judge_max_tokens or EXTRACTION_MAX_TOKENS,
    )
    m = res["metrics"]
    print(
        f"Object HalBench, protocol {args.protocol} ({m['n_records']} answers, {m['n_errors']} errors, prompt: {prompt_source}):"
    )
    if args.protocol == "paper":
        print(format_paper_summary(m))
    else:
        print(
            f"  ours: response hallucination {fmt(m['response_hallucination'])}  CHAIRs {fmt(m['chair_s'])}  "
            f"CHAIRi (mention) {fmt(m['chair_i'])}  recall {fmt(m['recall'])}  mean length {fmt(m['mean_length'], 1)}"
        )
    print(f"  -> {Path(args.out_dir) / 'results.json'}")


if __name__ == "__main__":
    main()
