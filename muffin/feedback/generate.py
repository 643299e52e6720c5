"""Stage 1, generate: the policy samples N candidate answers per prompt (paper: N 10, T 0.7, 512 new tokens).

    python -m muffin.feedback.generate --prompts prompts.jsonl --image-root DIR --policy CKPT \
        --out work/answers.jsonl --num-samples 10 --seed 0

Each answer's seed is derived from (run seed, prompt id, sample index) with SHA-256, so a rerun, a resume or a run
on a different number of GPUs gives the same answers. One output record per answer, keyed by ``answer_id``.
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

from muffin.decoding import CANDIDATE_SAMPLING, Decoding
from muffin.family import TRUST_REMOTE_CODE_HELP, ModelFamily, Sample, load_family
from muffin.feedback.records import Prompt, answer_id, load_prompts
from muffin.feedback.served import (
    Served,
    ServedModel,
    add_server_args,
    choice_texts,
    sampling_request,
    served_identity,
)
from muffin.feedback.stage import (
    ShardedOutput,
    add_model_args,
    add_overwrite_arg,
    add_runtime_args,
    chunks,
    finish_stage,
    stable_seed,
)
from muffin.inference import generate
from utils.dist import device_for_rank, setup_logging, shard
from utils.faults import call_per_record
from utils.fingerprint import code_digest, family_identity, model_identity, sha256_json

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class GenerateConfig:
    """Sampling settings of the generate stage."""

    num_samples: int = 10
    seed: int = 0
    batch_size: int = 8
    decoding: Decoding = CANDIDATE_SAMPLING
    policy: str = ""  # model name recorded in every answer (and later in the dataset's origin_split)

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")


def sample_seed(run_seed: int, prompt_id: str, sample_idx: int) -> int:
    """The seed of answer ``sample_idx`` of ``prompt_id`` (independent of batching and sharding)."""
    return stable_seed("generate", run_seed, prompt_id, sample_idx)


def expected_ids(prompts: Sequence[Prompt], num_samples: int) -> list[str]:
    return [answer_id(p.id, k) for p in prompts for k in range(num_samples)]


def _record(p: Prompt, k: int, seed: int, answer: str | None, policy: str, error: dict | None) -> dict[str, Any]:
    return {
        "answer_id": answer_id(p.id, k),
        "prompt_id": p.id,
        "sample_idx": k,
        "seed": seed,
        "question": p.question,
        "image_path": p.image_path,
        "answer": answer,
        "policy": policy,
        "error": error,
    }


def generate_fingerprint(family: ModelFamily, cfg: GenerateConfig, model_id: dict[str, Any] | None = None) -> dict:
    """What decides the answers besides each prompt: the policy (weights, LoRA, dtype), its name written into every
    record, the run seed, the decoding, and the code. Batch size, device and ``num_samples`` are left out (the
    answers do not depend on them: ``num_samples`` only adds or leaves out keys)."""
    from muffin import decoding, inference
    from muffin.fast import generation

    return {
        "stage": "generate",
        "policy": model_id or family_identity(family),
        "policy_name": cfg.policy,
        "seed": cfg.seed,
        "decoding": cfg.decoding.as_dict(),
        "code": code_digest(run_generate, inference, decoding, generation, type(family)),
    }


def prompt_inputs(prompts: Sequence[Prompt], num_samples: int) -> dict[str, str]:
    """answer id -> sha256 of what the answer is sampled from: prompt id, sample index, question, image bytes and
    the image path written into the record."""
    out = {}
    for p in prompts:
        base = {"id": p.id, "question": p.question, "image_path": p.image_path, "image": p.image_sha256()}
        for k in range(num_samples):
            out[answer_id(p.id, k)] = sha256_json({**base, "sample": k})
    return out


def run_generate(
    family: ModelFamily,
    prompts: Sequence[Prompt],
    out_path: str | Path,
    cfg: GenerateConfig,
    *,
    input_errors: Sequence[dict[str, Any]] = (),
    model_id: dict[str, Any] | None = None,
    overwrite: bool = False,
    wait: bool = True,
    progress: bool = True,
) -> list[dict[str, Any]] | None:
    """Sample ``cfg.num_samples`` answers for this rank's share of ``prompts``; resumable; returns merged records.

    A prompt whose image cannot be read yields ``num_samples`` records with ``answer: None`` and an ``error``; an
    empty answer is kept with an ``error`` so that later stages skip it (its zero claims would score best). An
    output made with another ``generate_fingerprint`` is refused unless ``overwrite``; an answer whose prompt was
    edited (question, image) is sampled again. ``model_id``: the policy's ``model_identity`` (pass it when a LoRA
    adapter was merged at load; by default it is read from the loaded model).
    """
    out = ShardedOutput(
        out_path,
        fingerprint=generate_fingerprint(family, cfg, model_id),
        inputs=prompt_inputs(prompts, cfg.num_samples),
        overwrite=overwrite,
        drop_errors=lambda e: e.get("stage") == "input",  # the prompt file's invalid lines are reported afresh
    )
    for e in input_errors:
        out.error(e["id"], e["stage"], e["reason"])
    todo = [(p, k) for p in shard(list(prompts)) for k in range(cfg.num_samples) if answer_id(p.id, k) not in out.done]
    logger.info(
        "generate: %d answers to sample (%d prompts on this rank, %d already done)",
        len(todo),
        len(shard(list(prompts))),
        len(out.done),
    )
    bar = tqdm(total=len(todo), desc="generate", disable=not progress)
    for chunk in chunks(todo, cfg.batch_size):
        images: dict[str, Any] = {}
        for p, _ in chunk:
            if p.id not in images:
                try:
                    images[p.id] = p.load_image()
                except (OSError, ValueError) as e:
                    images[p.id] = e
        ok = [(p, k) for p, k in chunk if not isinstance(images[p.id], Exception)]

        def sample(items: Sequence[tuple[Prompt, int]], images: dict[str, Any] = images) -> list[str]:
            return generate(
                family,
                [Sample(images[p.id], p.question) for p, _ in items],
                cfg.decoding,
                seeds=[sample_seed(cfg.seed, p.id, k) for p, k in items],  # per answer: batching changes nothing
                batch_size=cfg.batch_size,
            )

        answers = {answer_id(p.id, k): res for (p, k), res in zip(ok, call_per_record(sample, ok))}
        for p, k in chunk:
            aid, seed = answer_id(p.id, k), sample_seed(cfg.seed, p.id, k)
            if isinstance(images[p.id], Exception):
                reason = f"image unreadable: {images[p.id]}"
                out.error(p.id, "generate", reason)
                out.write(_record(p, k, seed, None, cfg.policy, {"stage": "generate", "reason": reason}))
                continue
            text, fault = answers[aid]
            if fault is not None:  # this answer alone failed (e.g. a prompt over the model's context)
                out.error(aid, "generate", fault["reason"], **{k: v for k, v in fault.items() if k != "reason"})
                out.write(_record(p, k, seed, None, cfg.policy, {"stage": "generate", **fault}))
                continue
            text = text.strip()
            err = None if text else {"stage": "generate", "reason": "empty answer"}
            if err:
                out.error(aid, "generate", "empty answer")
            out.write(_record(p, k, seed, text, cfg.policy, err))
        bar.update(len(chunk))
    bar.close()
    return out.finalize(expected_ids(prompts, cfg.num_samples), wait=wait)


def run_generate_served(
    model: ServedModel,
    prompts: Sequence[Any],
    out_path: str | Path,
    cfg: GenerateConfig,
    *,
    input_errors: Sequence[dict[str, Any]] = (),
    overwrite: bool = False,
    wait: bool = True,
    progress: bool = True,
) -> list[dict[str, Any]] | None:
    """The generate stage on a served policy: each prompt's ``cfg.num_samples`` answers as one request (``n``, a seed
    derived from the run seed and the prompt id, recorded in every answer), the same records, resumability and
    errors as the local stage."""
    fp = {"stage": "generate", "policy": served_identity(model), "policy_name": cfg.policy, "seed": cfg.seed,
          "decoding": cfg.decoding.as_dict(), "num_samples": cfg.num_samples,
          "code": code_digest(run_generate_served, _record)}  # fmt: skip
    out = ShardedOutput(out_path, fingerprint=fp, inputs=prompt_inputs(prompts, cfg.num_samples),
                        overwrite=overwrite, drop_errors=lambda e: e.get("stage") == "input")  # fmt: skip
    for e in input_errors:
        out.error(e["id"], e["stage"], e["reason"])
    todo = [p for p in shard(list(prompts)) if any(answer_id(p.id, k) not in out.done for k in range(cfg.num_samples))]
    dec = cfg.decoding
    step = model.concurrency * 2
    for start in tqdm(range(0, len(todo), step), desc="generate (served)", disable=not progress):
        chunk, requests, images = todo[start : start + step], [], {}
        for p in chunk:
            try:
                images[p.id] = p.load_image()
            except (OSError, ValueError) as e:
                images[p.id] = e
        live = [p for p in chunk if not isinstance(images[p.id], Exception)]
        for p in live:
            requests.append(sampling_request(images[p.id], p.question, n=cfg.num_samples, seed=_prompt_seed(cfg, p.id),
                                             temperature=dec.temperature, top_p=dec.top_p, max_tokens=dec.max_new_tokens))  # fmt: skip
        results = dict(zip([p.id for p in live], model.map(requests, validate=choice_texts)))
        for p in chunk:
            seed = _prompt_seed(cfg, p.id)
            if isinstance(images[p.id], Exception):
                reason = f"image unreadable: {images[p.id]}"
                out.error(p.id, "generate", reason)
                for k in range(cfg.num_samples):
                    out.write(_record(p, k, seed, None, cfg.policy, {"stage": "generate", "reason": reason}))
                continue
            res = results[p.id]
            texts = choice_texts(res.response) if res.response is not None else []
            if res.response is not None and len(texts) != cfg.num_samples:
                res, texts = Served(error=f"the server returned {len(texts)} choices for n={cfg.num_samples}"), []
            for k in range(cfg.num_samples):
                if res.response is None:
                    out.error(answer_id(p.id, k), "generate", res.error)
                    out.write(_record(p, k, seed, None, cfg.policy, {"stage": "generate", "reason": res.error}))
                    continue
                text = texts[k].strip()
                err = None if text else {"stage": "generate", "reason": "empty answer"}
                if err:
                    out.error(answer_id(p.id, k), "generate", "empty answer")
                out.write(_record(p, k, seed, text, cfg.policy, err))
    logger.info("served generate: %s", model.stats.as_dict())
    return out.finalize(expected_ids(prompts, cfg.num_samples), wait=wait)


def _prompt_seed(cfg: GenerateConfig, prompt_id: str) -> int:
    return stable_seed("generate-served", cfg.seed, prompt_id) % (2**31)  # servers take 32-bit seeds


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Counts for the manifest: answers, prompts, empty answers, unreadable images, mean answer length (words)."""
    ok = [r for r in records if not r.get("error")]
    return {
        "prompts": len({r["prompt_id"] for r in records}),
        "answers": len(records),
        "answers_ok": len(ok),
        "empty_answers": sum(1 for r in records if (r.get("error") or {}).get("reason") == "empty answer"),
        "image_errors": sum(1 for r in records if str((r.get("error") or {}).get("reason", "")).startswith("image")),
        "record_faults": sum(
            1 for r in records if r["answer"] is None and not str(r["error"]["reason"]).startswith("image")
        ),
        "mean_answer_words": round(sum(len(r["answer"].split()) for r in ok) / max(1, len(ok)), 2),
    }


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Sample N candidate answers per prompt with the policy model.")
    p.add_argument("--prompts", required=True, help="input JSONL (ds_question_id, image_path|image, question)")
    p.add_argument("--image-root", default=None, help="directory that relative image_path values start from")
    add_model_args(p, "policy", "the policy model that answers", required=False)
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_REMOTE_CODE_HELP)
    p.add_argument("--out", required=True, help="output JSONL, one record per answer")
    p.add_argument("--num-samples", type=int, default=10, help="answers per prompt (paper: 10)")
    p.add_argument("--temperature", type=float, default=CANDIDATE_SAMPLING.temperature)
    p.add_argument("--top-p", type=float, default=CANDIDATE_SAMPLING.top_p)
    p.add_argument("--max-new-tokens", type=int, default=CANDIDATE_SAMPLING.max_new_tokens)
    p.add_argument("--seed", type=int, default=0, help="run seed; each answer's seed derives from it")
    p.add_argument("--policy-name", default=None, help="name recorded in the data (default: checkpoint dir name)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N valid prompts")
    add_runtime_args(p, batch_size=8)
    add_overwrite_arg(p)
    add_server_args(p, "policy")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = make_parser().parse_args(argv)
    setup_logging()
    started = time.time()
    prompts, bad = load_prompts(args.prompts, args.image_root, args.limit)
    decoding = CANDIDATE_SAMPLING.replace(
        temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens
    )
    if (args.policy is None) == (args.policy_server is None):
        raise SystemExit("error: give the policy as a checkpoint (--policy DIR) or a server (--policy-server URL)")
    if args.policy_server is not None:  # the policy behind a server: a prompt's samples as one request
        from muffin.feedback.served import served_from_args

        model = served_from_args(args, "policy", args.out)
        cfg = GenerateConfig(num_samples=args.num_samples, seed=args.seed, batch_size=args.batch_size, decoding=decoding,
                             policy=args.policy_name or model.model)  # fmt: skip
        recs = run_generate_served(
            model, prompts, args.out, cfg, input_errors=bad, overwrite=args.overwrite, wait=not args.no_wait
        )
        described = {**model.identity(), "requests": model.stats.as_dict()}
    else:
        cfg = GenerateConfig(num_samples=args.num_samples, seed=args.seed, batch_size=args.batch_size,
                             decoding=decoding, policy=args.policy_name or Path(args.policy).name)  # fmt: skip
        family = load_family(
            args.policy,
            family=args.policy_family,
            dtype=args.dtype,
            device=args.device or device_for_rank(),
            lora_path=args.policy_lora,
            trust_remote_code=args.trust_remote_code,
        )
        model_id = model_identity(
            args.policy, lora=args.policy_lora, family=family.name, dtype=next(family.model.parameters()).dtype
        )
        recs = run_generate(
            family,
            prompts,
            args.out,
            cfg,
            input_errors=bad,
            model_id=model_id,
            overwrite=args.overwrite,
            wait=not args.no_wait,
        )
        described = {
            "policy_path": args.policy,
            "policy_lora": args.policy_lora,
            "trust_remote_code": args.trust_remote_code,
        }
    if recs is not None:
        config = {**asdict(cfg), "decoding": decoding.as_dict(), **described}
        counts = finish_stage(
            args.out,
            stage="generate",
            config=config,
            counts=summarize(recs),
            started=started,
            inputs={"prompts": args.prompts, "image_root": args.image_root, "invalid_prompts": len(bad)},
        )
        print(f"generate: {counts}")


if __name__ == "__main__":
    main()
