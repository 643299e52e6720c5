"""Object HalBench: CHAIR of detailed image descriptions against COCO ground truth, with rule or judge extraction.

    python -m eval.objhal --answers outputs/objhal/answers.jsonl \\
        --annotations coco2014/annotations/instances_val2014.json coco2014/annotations/instances_train2014.json \\
        --captions coco2014/annotations/captions_val2014.json coco2014/annotations/captions_train2014.json \\
        --extractor judge --judge openai --judge-model gpt-4o-2024-08-06 --out-dir outputs/objhal

Answers: JSONL (or a JSON list) of ``{"id", "image_id", "question", "answer"}`` (``id`` defaults to ``image_id``;
``text`` is read when ``answer`` is absent). Outputs ``samples.jsonl`` (per-answer mentions, hallucinations,
errors) and ``results.json``. ``evaluate_objhal`` is the same thing as a function, for orchestrators.
"""

from __future__ import annotations

import argparse
import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eval.chair import (
    RuleExtractor,
    chair_summary,
    load_ground_truth,
    load_synonyms,
    sample_detail,
    unique_mentions,
)
from eval.judges import Judge, JudgeRequest, add_judge_args, build_judge
from eval.parsers import fill_template, parse_object_list
from eval.prompts import OBJHAL_EXTRACTION, load_prompt
from eval.scoring import SampleStore, ask_and_parse, chunks, failure_fields, fmt, load_records, write_results

logger = logging.getLogger(__name__)

EXTRACTION_MAX_TOKENS = 512
SHORT_ANSWER_WORDS = 3  # as the published script: answers of <= 3 words mention no objects, the judge is skipped


def normalize_answers(answers: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``{id, image_id, question, answer}`` per record; a record that lacks a field gets ``error`` instead."""
    out, seen = [], set()
    for n, rec in enumerate(answers):
        key = rec.get("id", rec.get("question_id", rec.get("image_id")))
        item: dict[str, Any] = {"id": key if key is not None else f"record-{n}", "question": rec.get("question", "")}
        if key is not None and key in seen:  # keep the first answer; the repeat is reported, not silently merged
            item["id"] = f"{key}#duplicate-{n}"
            item["error"] = f"record {n} repeats id {key!r}; give every answer its own 'id'"
        seen.add(key)
        answer = rec.get("answer", rec.get("text"))
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
    synonyms_path: str | Path | None = None,
    extractor: str | Judge = "rule",
    captions_path: str | Path | Sequence[str | Path] | None = None,
    prompt: str | None = None,
    out_dir: str | Path | None = None,
    reasks: int = 2,
    chunk_size: int = 64,
    extra_config: dict[str, Any] | None = None,
    max_tokens: int = EXTRACTION_MAX_TOKENS,
) -> dict[str, Any]:
    """Score answers with CHAIR; returns ``{"metrics": ..., "samples": [...]}`` (see ``chair.chair_summary``).

    Args:
        answers: records with ``id`` (optional), ``image_id``, ``question``, ``answer``.
        annotations_path: COCO-format instances file(s) giving the ground-truth objects.
        synonyms_path: synonym table (``canonical, synonym, ...`` per line); default our COCO table, which also
            turns on the COCO stop phrases and modifiers of ``chair.RuleExtractor``.
        extractor: ``"rule"`` (offline) or a judge that lists the objects (a JSON list per answer).
        captions_path: optional COCO caption file(s) whose objects are added to the ground truth.
        prompt: the judge's extraction template with ``{question}``/``{answer}`` slots (default: ours).
        out_dir: when given, per-sample records go to ``samples.jsonl`` there (resumable) and ``results.json``.
        extra_config: more entries for the results JSON's ``config`` (e.g. the prompt's source).
        max_tokens: the judge's answer budget.

    Example:
        >>> res = evaluate_objhal([{"image_id": 1, "answer": "A dog on a sofa."}], "instances.json")  # doctest: +SKIP
        >>> res["metrics"]["chair_i"]  # doctest: +SKIP
    """
    started = time.time()
    table = load_synonyms(synonyms_path)
    rules = RuleExtractor.for_table(table, coco_rules=synonyms_path is None)
    items = normalize_answers(answers)
    ann = [annotations_path] if isinstance(annotations_path, str | Path) else list(annotations_path)
    caps = (
        []
        if captions_path is None
        else [captions_path]
        if isinstance(captions_path, str | Path)
        else list(captions_path)
    )
    truth = load_ground_truth(
        ann,
        table,
        captions=caps,
        extractor=rules,
        image_ids=[i["image_id"] for i in items if i.get("image_id") is not None],
    )
    for it in items:
        if "error" not in it and it["image_id"] not in truth:
            it["error"] = f"image_id {it['image_id']} (id {it['id']!r}) is not in {', '.join(map(str, ann))}"
    store = SampleStore(Path(out_dir) / "samples.jsonl") if out_dir is not None else None
    done = {} if store is None else {k: r for k, r in store.records.items() if store.is_done(k)}
    todo = [it for it in items if it["id"] not in done]
    results = dict(done)
    for part in chunks(todo, chunk_size):
        for rec in _score_chunk(part, truth, rules, extractor, prompt or OBJHAL_EXTRACTION, reasks, max_tokens):
            results[rec["id"]] = rec
            if store is not None:
                store.write(rec)
    if store is not None:
        store.close()
    samples = [results[it["id"]] for it in items if it["id"] in results]
    scored = [s for s in samples if "error" not in s]
    metrics = {**chair_summary(scored), "n_records": len(items), "n_errors": len(samples) - len(scored)}
    out = {"metrics": metrics, "samples": samples}
    if out_dir is not None:
        judge = None if isinstance(extractor, str) else extractor
        config = {
            "annotations": [str(a) for a in ann],
            "captions": [str(c) for c in caps],
            "synonyms": table.source,
            "extractor": "rule" if judge is None else "judge",
            "reasks": reasks,
            **(extra_config or {}),
        }
        write_results(out_dir, benchmark="objhal", metrics=metrics, config=config, judge=judge, started=started)
    return out


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
    p.add_argument("--synonyms", default=None, help="synonym table, one class per line (default: our COCO table)")
    p.add_argument(
        "--extractor",
        choices=["rule", "judge"],
        default="judge",
        help="judge: the published protocol (a judge lists the objects); rule: offline word matching",
    )
    p.add_argument("--prompt-file", default=None, help="extraction prompt with {question}/{answer} slots")
    p.add_argument("--reasks", type=int, default=2, help="re-asks of the judge after an unparseable answer")
    p.add_argument("--out-dir", required=True, help="writes samples.jsonl and results.json here")
    add_judge_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    from utils.dist import setup_logging

    setup_logging()
    args = make_parser().parse_args(argv)
    prompt, prompt_source = load_prompt(args.prompt_file, OBJHAL_EXTRACTION)
    extractor = build_judge(args, Path(args.out_dir) / "judge_cache.sqlite") if args.extractor == "judge" else "rule"
    res = evaluate_objhal(
        load_records(args.answers),
        args.annotations,
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
    print(f"Object HalBench ({m['n_answers']} answers, {m['n_errors']} errors, prompt: {prompt_source}):")
    print(
        f"  response hallucination {fmt(m['response_hallucination'])}  CHAIRs {fmt(m['chair_s'])}  "
        f"CHAIRi (mention) {fmt(m['chair_i'])}  recall {fmt(m['recall'])}  mean length {fmt(m['mean_length'], 1)}"
    )
    print(f"  -> {Path(args.out_dir) / 'results.json'}")


if __name__ == "__main__":
    main()
