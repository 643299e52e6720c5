"""Family-independent inference on top of ``ModelFamily``: batched generation, answer log-probs, yes/no scores.

These are the only entry points the pipeline, the evaluators and the chat API use to run a model.
"""

from __future__ import annotations

import itertools
import logging
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessorList

from muffin.decoding import Decoding, SeededSamplingProcessor
from muffin.family import ModelFamily, Sample
from muffin.fast.generation import PrefixNotShareable
from muffin.fast.packing import prepare_answer_logps, prepare_next_token, run_answer_logps, run_next_token

logger = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")


@dataclass
class AnswerLogps:
    """Log-probs of an answer's tokens plus the end-of-turn token, under the model."""

    sum: float
    mean: float
    per_token: list[float]


def prefetched(fn: Callable[[T], R], items: Iterable[T], depth: int = 1, background: bool = True) -> Iterator[R]:
    """``fn(item)`` for each item in order, with the next ``depth`` items' ``fn`` already running in a background
    thread while the caller works on the current result: the CPU side of a batch (tokenising, image preprocessing,
    packing) overlaps the GPU work of the previous one. Exceptions surface at the item that raised them.
    ``background=False`` calls ``fn`` inline: when the model runs on the CPU, a thread next to torch's own threads
    only competes with them (docs/PERFORMANCE.md)."""
    if not background:
        yield from map(fn, items)
        return
    items = iter(items)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as pool:
        pending = deque(pool.submit(fn, it) for it in itertools.islice(items, depth + 1))
        try:
            while pending:
                result = pending.popleft().result()
                yield result  # the caller works on it while the next ``depth`` items are prepared
                for it in itertools.islice(items, 1):
                    pending.append(pool.submit(fn, it))
        finally:
            for f in pending:  # the caller stopped early or an item failed: drop the work not started
                f.cancel()


def on_accelerator(family: ModelFamily) -> bool:
    """Whether the model runs off the CPU (where preparing the next batch in a thread overlaps the model's work)."""
    return torch.device(family.device).type != "cpu"


def _batches(n: int, batch_size: int) -> list[range]:
    return [range(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


@torch.inference_mode()
def generate(
    family: ModelFamily,
    samples: Sequence[Sample],
    decoding: Decoding,
    *,
    seeds: Sequence[int] | None = None,
    batch_size: int = 8,
    progress: bool = False,
    share_prefix: bool = True,
) -> list[str]:
    """Answer each sample's question; batched with left padding and an attention mask.

    Greedy and beam search are deterministic. Sampling with ``seeds`` (one per sample) is repeatable per sample
    whatever the batching; sampling without seeds uses torch's global RNG. Beam sampling (``num_beams > 1`` and
    ``do_sample``) seeds the global RNG with the batch's first seed. Consecutive samples with the same image object
    and question (a prompt sampled several times, as the generate stage lays them out) are encoded and prefilled
    once per batch on families that support it (LLaVA, OmniLMM: ``muffin.fast.generation``); the answers are the same up
    to rounding (bit for bit in float32). ``share_prefix=False`` runs every row's prompt.
    """
    if seeds is not None and len(seeds) != len(samples):
        raise ValueError(f"got {len(seeds)} seeds for {len(samples)} samples; pass one seed per sample")
    out: list[str] = []
    batches = _batches(len(samples), batch_size)
    # runs of consecutive samples with one image object and question (a prompt sampled several times) are encoded
    # and prefilled once when the family can (``muffin.fast.generation``); beam search expands its own rows
    share = share_prefix and family.fast.shares_generation_prefix and decoding.num_beams == 1
    runs = [_runs(samples, idx) if share else [[i] for i in idx] for idx in batches]
    encoded = prefetched(
        lambda rs: family.encode([samples[r[0]] for r in rs], for_generation=True),
        runs,
        background=on_accelerator(family),
    )
    for idx, rs, batch in tqdm(zip(batches, runs, encoded), total=len(batches), desc="generate", disable=not progress):
        kwargs = decoding.to_generate_kwargs()
        if decoding.do_sample and seeds is not None:
            if decoding.num_beams == 1:
                kwargs = {k: v for k, v in kwargs.items() if k not in ("temperature", "top_p", "top_k")}
                kwargs["do_sample"] = False
                kwargs["logits_processor"] = LogitsProcessorList(
                    [
                        SeededSamplingProcessor(
                            [seeds[i] for i in idx], decoding.temperature, decoding.top_k, decoding.top_p
                        )
                    ]
                )
            else:
                torch.manual_seed(int(seeds[idx[0]]))
        if any(len(r) > 1 for r in rs):  # (runs are single rows when sharing is off)
            try:
                ids = family.generate_ids(batch, repeats=[len(r) for r in rs], **kwargs)
            except PrefixNotShareable:  # a prompt beyond the model's sliding window: every row runs its prompt
                ids = family.generate_ids(family.encode([samples[i] for i in idx], for_generation=True), **kwargs)
        else:  # no prompt repeated in this batch (or sharing off): its rows as encoded
            ids = family.generate_ids(batch, **kwargs)
        out.extend(family.decode(ids))
    return out


def _runs(samples: Sequence[Sample], idx: Sequence[int]) -> list[list[int]]:
    """``idx`` split into runs of consecutive samples that share an image object and a question."""
    return [[idx[j] for j in g] for g in group_consecutive([samples[i] for i in idx], same_question=True)]


def group_consecutive(samples: Sequence[Sample], same_question: bool) -> list[list[int]]:
    """Indices of runs of consecutive samples sharing one image object (and question, if asked)."""
    groups: list[list[int]] = []
    for i, s in enumerate(samples):
        prev = samples[i - 1] if i else None
        if (
            prev is not None
            and s.image is not None
            and s.image is prev.image
            and (not same_question or s.question == prev.question)
        ):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _group_batches(groups: list[list[int]], batch_size: int) -> list[list[list[int]]]:
    """Whole groups per batch, about ``batch_size`` samples each (a larger group forms its own batch)."""
    out: list[list[list[int]]] = [[]]
    for g in groups:
        if out[-1] and sum(map(len, out[-1])) + len(g) > batch_size:
            out.append([])
        out[-1].append(g)
    return [b for b in out if b]


@torch.inference_mode()
def answer_logps(
    family: ModelFamily,
    samples: Sequence[Sample],
    *,
    batch_size: int = 8,
    progress: bool = False,
    packed: bool | None = None,
) -> list[AnswerLogps]:
    """Log-probs of each sample's ``answer`` (answer tokens plus end-of-turn) given image and question.

    Consecutive samples with the same image object and question (e.g. a pair's chosen and rejected answers) are
    packed behind one shared prefix when the family supports it (``muffin.fast.packing``); ``packed=False`` forces the
    plain path. Both give the same numbers.
    """
    for i, s in enumerate(samples):
        if s.answer is None:
            raise ValueError(f"sample {i} has no answer; answer_logps scores given answers")
    out: list[AnswerLogps] = []
    batches = _group_batches(group_consecutive(samples, same_question=True), batch_size)
    prepared = prefetched(
        lambda groups: prepare_answer_logps(family, [[samples[i] for i in g] for g in groups], packed),
        batches,
        background=on_accelerator(family),
    )
    for prep in tqdm(prepared, total=len(batches), desc="logps", disable=not progress):
        res = run_answer_logps(family, prep)
        for k, tok in enumerate(res.per_token):
            out.append(AnswerLogps(float(res.sums[k]), float(res.means[k]), tok.float().tolist()))
    return out


# family -> (yes ids, no ids): the labeler's read-out tokens, kept while the family lives
_YES_NO_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def first_answer_token(family: ModelFamily, word: str) -> int:
    """Id of the first token of ``word`` when it starts the assistant's answer (template-aware, any tokenizer)."""
    batch = family.encode([Sample(None, "?", word)], for_generation=False)
    pos = batch["answer_mask"][0].nonzero()[0, 0]
    return int(batch["input_ids"][0, pos])


def yes_no_token_ids(family: ModelFamily) -> tuple[list[int], list[int]]:
    """Distinct first-token ids of ("yes", "Yes") and ("no", "No") as answers, computed once per family object."""
    cached = _YES_NO_IDS.get(family)
    if cached is None:
        yes = sorted({first_answer_token(family, w) for w in ("yes", "Yes")})
        no = sorted({first_answer_token(family, w) for w in ("no", "No")})
        if set(yes) & set(no):
            raise ValueError(
                f"the tokenizer of {type(family).__name__} cannot tell yes from no by their first token "
                f"(yes ids {yes}, no ids {no}); the labeler needs distinct answer tokens"
            )
        cached = (yes, no)
        _YES_NO_IDS[family] = cached
    return cached


@torch.inference_mode()
def yes_no_probs(
    family: ModelFamily,
    samples: Sequence[Sample],
    *,
    batch_size: int = 16,
    progress: bool = False,
    packed: bool | None = None,
) -> list[tuple[float, float]]:
    """(P(yes)+P(Yes), P(no)+P(No)) of the first answer token after each yes/no question (the labeler's read-out).

    Consecutive samples with the same image object are packed behind one copy of the image and the shared prompt
    prefix when the family supports it (``muffin.fast.packing``), so each image is encoded once per batch; pass the
    questions of one image together, with the same PIL object. ``packed=False`` forces the plain path.
    """
    yes_ids, no_ids = yes_no_token_ids(family)
    out: list[tuple[float, float]] = []
    batches = _group_batches(group_consecutive(samples, same_question=False), batch_size)
    prepared = prefetched(
        lambda groups: prepare_next_token(family, [[samples[i] for i in g] for g in groups], packed),
        batches,
        background=on_accelerator(family),
    )
    for prep in tqdm(prepared, total=len(batches), desc="yes/no", disable=not progress):
        probs = run_next_token(family, prep).softmax(-1)
        p_yes = probs[:, yes_ids].sum(-1)
        p_no = probs[:, no_ids].sum(-1)
        out.extend(zip(p_yes.tolist(), p_no.tolist()))
    return out
