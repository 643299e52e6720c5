"""The answer stage: a checkpoint of any family answers a benchmark's questions with the benchmark's decoding.

    python -m eval.answer --benchmark mmhal --model-path checkpoints/RLAIF-V-7B \\
        --questions mmhal-template \\
        --image-root data/mmhal/images --out outputs/mmhal/answers.jsonl
    torchrun --nproc_per_node 8 -m eval.answer ...     # sharded: one shard file per rank, merged by rank 0

Decoding defaults to the family's ``chat_decoding`` (LLaVA 1.5: 3 beams, greedy, up to 1024 new tokens).
``--best-of N --reward-reference BASE`` answers each question with the best of N samples by the self-feedback
reward of ``--reward-model`` (default: the answering model) against BASE (``muffin.reward``).
Resumable: answers already in the (shard) file are kept; a killed run continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from eval.scoring import load_records
from muffin.decoding import Decoding
from muffin.family import TRUST_REMOTE_CODE_HELP, ModelFamily, Sample
from utils import dist
from utils.faults import call_per_record
from utils.fetch import file_or_name
from utils.fingerprint import (
    check_fingerprint,
    code_digest,
    family_identity,
    model_identity,
    remove_paths,
    sha256_bytes,
    sha256_file,
    sha256_json,
)
from utils.images import load_image
from utils.io import JsonlWriter, atomic_write_text, iter_jsonl, write_manifest

logger = logging.getLogger(__name__)


def _find(root: Path | None, *names: str) -> str | None:
    if root is None:
        return None
    for name in names:
        if name and (root / name).is_file():
            return str(root / name)
    return None


def objhal_questions(path: str | Path, image_root: str | Path | None = None) -> list[dict[str, Any]]:
    """Object HalBench prompts: ``image_id``, ``question`` and ``image`` (path or base64) or ``image_path``;
    without either, the image is looked up in ``image_root`` as ``COCO_val2014_<12-digit id>.jpg`` or ``<id>.jpg``."""
    root = Path(image_root) if image_root else None
    out = []
    for n, rec in enumerate(load_records(path, what="--questions")):
        image_id = rec.get("image_id")
        image = rec.get("image") or _find(root, rec.get("image_path", "")) or rec.get("image_path")
        if image is None and image_id is not None:
            image = _find(
                root,
                f"COCO_val2014_{int(image_id):012d}.jpg",
                f"COCO_train2014_{int(image_id):012d}.jpg",
                f"{image_id}.jpg",
            )
        out.append(
            {
                "id": rec.get("id", image_id if image_id is not None else n),
                "image_id": image_id,
                "question": rec.get("question", rec.get("prompt", "")),
                "image": image,
            }
        )
    return out


def mmhal_questions(path: str | Path, image_root: str | Path | None = None) -> list[dict[str, Any]]:
    """MMHal-Bench items (``id`` = index); images from ``image_root`` by the file name of ``image_src``."""
    root = Path(image_root) if image_root else None
    out = []
    for i, rec in enumerate(load_records(path, what="--questions")):
        src = str(rec.get("image_src", ""))
        image = _find(root, src.rsplit("/", 1)[-1], f"{rec.get('image_id')}.jpg", f"{rec.get('image_id')}.png")
        out.append(
            {
                "id": i,
                "question": rec["question"],
                "question_type": rec.get("question_type"),
                "image_id": rec.get("image_id"),
                "image": image or src,
            }
        )
    return out


def refomb_questions(path: str | Path, image_root: str | Path | None = None) -> list[dict[str, Any]]:
    """RefoMB items; images from ``image_root`` by the file name of ``image_url``."""
    root = Path(image_root) if image_root else None
    out = []
    for rec in load_records(path, what="--questions"):
        url = str(rec.get("image_url", ""))
        out.append(
            {
                "id": rec["id"],
                "question": rec["question"],
                "type": rec.get("type"),
                "image_url": url,
                "image": _find(root, url.rsplit("/", 1)[-1]) or url,
            }
        )
    return out


def jsonl_questions(path: str | Path, image_root: str | Path | None = None) -> list[dict[str, Any]]:
    """Generic records: ``id``, ``question``, ``image`` (path relative to ``image_root``, absolute, or base64)."""
    root = Path(image_root) if image_root else None
    return [
        {**rec, "image": _find(root, str(rec.get("image", ""))) or rec.get("image")}
        for rec in load_records(path, what="--questions")
    ]


# --- AMBER and POPE (issue 29; eval/amber.py and eval/pope.py score them) ---
def amber_questions(path: str | Path, image_root: str | Path | None = None) -> list[dict[str, Any]]:
    """AMBER query files (a JSON list of ``id, image, query``, e.g. ``query_all.json``); images ``AMBER_<n>.jpg``
    from ``image_root``."""
    root = Path(image_root) if image_root else None
    return [
        {"id": rec["id"], "question": rec["query"], "image_file": rec["image"], "image": _find(root, rec["image"])}
        for rec in load_records(path, what="--questions")
    ]


def pope_questions(path: str | Path, image_root: str | Path | None = None) -> list[dict[str, Any]]:
    """POPE question files (a ``coco_pope_<split>.json`` or a folder of them, splits in POPE's order); ``id`` is
    ``<split>/<question_id>``; images (COCO val2014 file names) from ``image_root``."""
    from eval.pope import load_questions

    root = Path(image_root) if image_root else None
    return [
        {
            "id": q["id"],
            "split": q["split"],
            "question": q["text"],
            "image_file": q["image"],
            "image": _find(root, q["image"]),
        }
        for q in load_questions(path)
    ]


# --- end AMBER and POPE ---


BENCHMARKS: dict[str, Callable[..., list[dict[str, Any]]]] = {
    "objhal": objhal_questions,
    "mmhal": mmhal_questions,
    "refomb": refomb_questions,
    "jsonl": jsonl_questions,
    "amber": amber_questions,
    "pope": pope_questions,
}


def answer_fingerprint(
    family: ModelFamily, decoding: Decoding, model_id: dict[str, Any] | None = None, best_of: BestOf | None = None
) -> dict:
    """What decides the answers besides each question: the model (weights, LoRA, dtype), the decoding, best-of-N
    (its reward models, N, sampling and seed) and the code; batch size, device and ranks are left out."""
    from muffin import inference, reward
    from muffin.fast import generation

    fp = {
        "stage": "answer",
        "model": model_id or family_identity(family),
        "decoding": decoding.as_dict(),
        "code": code_digest(run_answers, inference, generation, type(family)),
    }
    if best_of is not None:
        fp["best_of"] = {
            **best_of.describe(),
            "reward_model": family_identity(best_of.reward.aligned),
            "reward_reference": family_identity(best_of.reward.reference),
            "code": code_digest(reward),
        }
    return fp


def _image_digest(image: Any) -> str | None:
    """sha256 of an image given as a path (the file's bytes) or inline (the string itself)."""
    if image is None:
        return None
    if isinstance(image, str) and not image.startswith("data:"):
        try:
            if Path(image).is_file():
                return sha256_file(image)
        except OSError:  # a long base64 string is no valid file name
            pass
    return sha256_bytes(str(image).encode())


def question_inputs(questions: Sequence[dict[str, Any]]) -> dict[Any, str]:
    """question id -> sha256 of the question record with its image's bytes: an edited question or a replaced
    image is answered again."""
    return {q["id"]: sha256_json({**q, "image": _image_digest(q.get("image"))}) for q in questions}


def fingerprint_file(out_path: str | Path) -> Path:
    return Path(f"{out_path}.fingerprint.json")


def errors_file(out_path: str | Path) -> Path:
    out = Path(out_path)
    return out.with_name(f"{out.stem}.errors{out.suffix or '.jsonl'}")


def _start_over(out_path: str | Path) -> None:
    paths = [Path(dist.shard_path(out_path))]
    if dist.is_main():
        paths += [Path(out_path), errors_file(out_path), Path(f"{out_path}.manifest.json"), fingerprint_file(out_path)]
    remove_paths(paths)


class BestOf:
    """Best-of-N answering: N seeded samples per question, the one with the highest per-token self-feedback reward
    (``muffin.reward``); question ``q`` samples with seeds derived from (``seed``, q's id)."""

    def __init__(self, reward: Any, n: int, decoding: Decoding, seed: int = 0) -> None:
        self.reward, self.n, self.decoding, self.seed = reward, n, decoding, seed

    def describe(self) -> dict[str, Any]:
        return {"n": self.n, "decoding": self.decoding.as_dict(), "seed": self.seed, "rank_by": "mean"}

    def answer(self, family: ModelFamily, sample: Sample, qid: Any) -> dict[str, Any]:
        from muffin.feedback.stage import stable_seed
        from muffin.reward import best_of_n

        res = best_of_n(family, self.reward, sample.image, sample.question, self.n, self.decoding,
                        seed=stable_seed("best-of", self.seed, qid))  # fmt: skip
        return {
            "answer": res.answer.strip(),
            "best_of": {
                "index": res.index,
                "reward_means": [r.mean for r in res.rewards],
                "reward_sums": [r.sum for r in res.rewards],
            },  # fmt: skip
        }


def _answer_batch(
    family: ModelFamily,
    batch: Sequence[dict[str, Any]],
    decoding: Decoding,
    batch_size: int,
    best_of: BestOf | None = None,
) -> list:
    """Records of one batch in question order: the answer, or ``answer: null`` with the ``error`` (an unreadable
    image; a question that fails alone, e.g. over the model's context, with the ``limit`` it exceeded)."""
    from muffin.inference import generate

    recs: list[dict[str, Any]] = []
    samples, rows = [], []
    for q in batch:
        meta = {k: v for k, v in q.items() if k != "image"}
        try:
            if q.get("image") is None:
                raise ValueError("no image given and none found under --image-root")
            img = load_image(q["image"], what=f"question {q['id']!r}, field 'image'")
        except (OSError, ValueError, TypeError) as e:
            recs.append({**meta, "answer": None, "error": str(e)})
            continue
        rows.append(len(recs))
        recs.append(meta)
        samples.append(Sample(img, q["question"]))
    if best_of is None:
        results = call_per_record(lambda ss: generate(family, list(ss), decoding, batch_size=batch_size), samples)
    else:
        ids = [recs[row]["id"] for row in rows]
        results = call_per_record(
            lambda pairs: [best_of.answer(family, s, i) for s, i in pairs], list(zip(samples, ids))
        )
    for row, (text, fault) in zip(rows, results):
        if fault is None and isinstance(text, dict):  # best-of-N: the answer with its candidates' rewards
            recs[row] = {**recs[row], **text}
        elif fault is None:
            recs[row] = {**recs[row], "answer": text.strip()}
        else:
            logger.warning("question %r: %s", recs[row]["id"], fault["reason"])
            recs[row] = {
                **recs[row],
                "answer": None,
                "error": fault["reason"],
                **({"limit": fault["limit"]} if "limit" in fault else {}),
            }
    return recs


def run_answers(
    family: ModelFamily,
    questions: Sequence[dict[str, Any]],
    out_path: str | Path,
    *,
    decoding: Decoding | None = None,
    batch_size: int = 8,
    model_id: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    best_of: BestOf | None = None,
) -> Path:
    """Answer this rank's shard of ``questions`` into ``shard_path(out_path)``; returns that file.

    A question whose image cannot be loaded, or that fails alone (``utils.faults``), is written with
    ``answer: null`` and the ``error``; the score stage records it as unanswered. Questions already in the file are
    skipped (resume), unless the question or its image changed since (``input_sha256``). An answers file made
    with another ``answer_fingerprint`` (model, decoding, code) is refused unless ``overwrite``.
    """
    decoding = decoding or family.chat_decoding
    check_fingerprint(
        fingerprint_file(out_path),
        answer_fingerprint(family, decoding, model_id, best_of),
        output=str(out_path),
        overwrite=overwrite,
        has_output=any(Path(p).is_file() and Path(p).stat().st_size for p in (out_path, dist.shard_path(out_path))),
        start_over=lambda: _start_over(out_path),
        write=dist.is_main(),
    )
    inputs = question_inputs(questions)
    path = Path(dist.shard_path(out_path))
    latest = {r["id"]: r for r in iter_jsonl(path)} if path.is_file() else {}
    stale = {k for k, r in latest.items() if r.get("input_sha256") != inputs.get(k)}
    writer = JsonlWriter(path, key="id")
    writer.done -= stale
    if stale & set(inputs):
        logger.info("%s: %d questions changed since they were answered; answering them again", path, len(stale))
    todo = [q for q in dist.shard(list(questions)) if q["id"] not in writer.done]
    logger.info("rank %d: %d questions to answer (%d done) -> %s", dist.rank(), len(todo), len(writer.done), path)
    for start in tqdm(range(0, len(todo), batch_size), desc="answer", disable=not progress or not dist.is_main()):
        recs = _answer_batch(family, todo[start : start + batch_size], decoding, batch_size, best_of)
        writer.write_many({**r, "input_sha256": inputs[r["id"]]} for r in recs)  # in question order
    writer.close()
    if dist.world_size() == 1 and (stale or len(latest) > len(inputs)):
        merge_shards(out_path, questions, 1)  # one record per question, in order: a re-answered one replaced
    return path


def merge_shards(out_path: str | Path, questions: Sequence[dict[str, Any]], world: int) -> int:
    """Merge the ranks' shard files into ``out_path`` in question order (the last record of an id wins: a
    question answered again replaces its old answer) and write the errors file; returns the number of records."""
    per_rank = [
        list(iter_jsonl(dist.shard_path(out_path, r, world)))
        for r in range(world)
        if Path(dist.shard_path(out_path, r, world)).exists()
    ]
    merged = dist.merge_in_order(per_rank, [q["id"] for q in questions], "id")
    atomic_write_text(out_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in merged))
    failed = [
        {"id": r["id"], "stage": "answer", "reason": r["error"], **({"limit": r["limit"]} if "limit" in r else {})}
        for r in merged
        if r.get("answer") is None and r.get("error")
    ]
    atomic_write_text(errors_file(out_path), "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in failed))
    if len(merged) < len(questions):
        logger.warning("%s has %d of %d answers; rerun the missing ranks", out_path, len(merged), len(questions))
    return len(merged)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Answer a benchmark's questions with a checkpoint of any family.")
    p.add_argument("--benchmark", choices=sorted(BENCHMARKS), required=True, help="how to read --questions")
    p.add_argument(
        "--questions",
        required=True,
        type=file_or_name,
        help="the benchmark's question file, or a published file's name (python -m utils.fetch --list)",
    )
    p.add_argument("--image-root", default=None, help="folder with the benchmark's images")
    p.add_argument("--model-path", required=True, help="checkpoint directory (config.json)")
    p.add_argument("--lora-path", default=None, help="LoRA adapter to merge at load")
    p.add_argument("--family", default=None, help="force a model family (default: from config.json)")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_REMOTE_CODE_HELP)
    p.add_argument("--dtype", default=None, help="bf16 / fp16 / fp32 (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--out", required=True, help="answers JSONL")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=None, help="override the family's chat decoding")
    p.add_argument("--num-beams", type=int, default=None, help="override the family's chat decoding")
    p.add_argument("--limit", type=int, default=None, help="answer only the first N questions (smoke tests)")
    p.add_argument("--merge-only", action="store_true", help="only merge existing shard files into --out")
    p.add_argument("--best-of", type=int, default=1, help="answer with the best of N samples by the reward")
    p.add_argument("--reward-model", default=None, help="the reward's aligned checkpoint (default: --model-path)")
    p.add_argument("--reward-reference", default=None, help="the reward's reference checkpoint (needed by --best-of)")
    p.add_argument("--best-of-temperature", type=float, default=0.7, help="sampling temperature of the N candidates")
    p.add_argument("--seed", type=int, default=0, help="seeds of the --best-of samples")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start over: remove --out, its shards, errors, manifest and fingerprint. Without it, a rerun resumes "
        "and refuses answers made with another model, decoding or code (docs/RESUMING.md)",
    )
    return p


def _best_of(args: argparse.Namespace, family: ModelFamily, decoding: Decoding) -> BestOf:
    """The --best-of answerer: the reward's models (the answering model itself unless --reward-model names another
    checkpoint) and T 0.7 sampling at the benchmark's length."""
    from muffin.decoding import CANDIDATE_SAMPLING
    from muffin.reward import reward_for

    if args.reward_reference is None:
        raise SystemExit(
            "error: --best-of needs --reward-reference (the checkpoint the reward model was aligned from)"
        )
    reward = reward_for(family, args.model_path, args.reward_model, args.reward_reference, policy_lora=args.lora_path,
                        dtype=args.dtype, device=dist.device_for_rank())  # fmt: skip
    sampling = CANDIDATE_SAMPLING.replace(max_new_tokens=decoding.max_new_tokens, temperature=args.best_of_temperature)
    return BestOf(reward, args.best_of, sampling, args.seed)


def main(argv: Sequence[str] | None = None) -> None:
    from muffin.family import load_family

    dist.setup_logging()
    args = make_parser().parse_args(argv)
    started = time.time()
    questions = BENCHMARKS[args.benchmark](args.questions, args.image_root)[: args.limit]
    world = dist.world_size()
    decoding: Decoding | None = None
    if not args.merge_only:
        family = load_family(
            args.model_path,
            family=args.family,
            dtype=args.dtype,
            device=dist.device_for_rank(),
            lora_path=args.lora_path,
            trust_remote_code=args.trust_remote_code,
        )
        overrides = {
            k: v for k, v in (("max_new_tokens", args.max_new_tokens), ("num_beams", args.num_beams)) if v is not None
        }
        decoding = family.chat_decoding.replace(**overrides)
        best_of = _best_of(args, family, decoding) if args.best_of > 1 else None
        model_id = model_identity(
            args.model_path, lora=args.lora_path, family=family.name, dtype=next(family.model.parameters()).dtype
        )
        run_answers(
            family,
            questions,
            args.out,
            decoding=decoding,
            batch_size=args.batch_size,
            model_id=model_id,
            overwrite=args.overwrite,
            best_of=best_of,
        )
        if world > 1:
            _sync()
    if dist.is_main():
        n = merge_shards(args.out, questions, world)
        fp = fingerprint_file(args.out)
        write_manifest(
            f"{args.out}.manifest.json",
            stage="answer",
            config=vars(args),
            counts={"answers": n},
            started=started,
            decoding=decoding.as_dict() if decoding is not None else None,
            fingerprint=json.loads(fp.read_text()) if fp.is_file() else None,
        )
        print(f"{n} answers -> {args.out}")


def _sync() -> None:
    import torch.distributed as tdist

    if not tdist.is_initialized() and os.environ.get("MASTER_ADDR"):
        tdist.init_process_group("gloo")
    dist.barrier()


if __name__ == "__main__":
    main()
