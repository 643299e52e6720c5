"""Family-independent inference on top of ``ModelFamily``: batched generation, answer log-probs, yes/no scores.

These are the only entry points the pipeline, the evaluators and the chat API use to run a model.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessorList

from muffin.decoding import Decoding, SeededSamplingProcessor
from muffin.family import ModelFamily, Sample

logger = logging.getLogger(__name__)


@dataclass
class AnswerLogps:
    """Log-probs of an answer's tokens plus the end-of-turn token, under the model."""

    sum: float
    mean: float
    per_token: list[float]


def token_logps(
    logits: torch.Tensor, input_ids: torch.Tensor, answer_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log p(x_t | x_<t) of the answer tokens.

    Args:
        logits: (B, T, V) with position t predicting token t+1.
        input_ids: (B, T).
        answer_mask: (B, T) bool, True on answer tokens (and the end-of-turn token).
    Returns:
        logps (B, T-1) float32, zero where masked; mask (B, T-1) bool, aligned with ``input_ids[:, 1:]``.
    """
    labels = input_ids[:, 1:]  # (B, T-1)
    mask = answer_mask[:, 1:].bool()
    logits = logits[:, :-1]  # (B, T-1, V)
    # gather then subtract logsumexp: never builds a float32 (B, T, V) log-softmax tensor beyond one logsumexp pass
    picked = torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1).float()
    lse = torch.logsumexp(logits.float(), dim=-1)
    logps = (picked - lse) * mask
    return logps, mask


def reduce_logps(logps: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, mean) over masked tokens, each (B,)."""
    total = logps.sum(-1)
    return total, total / mask.sum(-1).clamp(min=1)


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
) -> list[str]:
    """Answer each sample's question; batched with left padding and an attention mask.

    Greedy and beam search are deterministic. Sampling with ``seeds`` (one per sample) is repeatable per sample
    whatever the batching; sampling without seeds uses torch's global RNG. Beam sampling (``num_beams > 1`` and
    ``do_sample``) seeds the global RNG with the batch's first seed.
    """
    if seeds is not None and len(seeds) != len(samples):
        raise ValueError(f"got {len(seeds)} seeds for {len(samples)} samples; pass one seed per sample")
    out: list[str] = []
    for idx in tqdm(_batches(len(samples), batch_size), desc="generate", disable=not progress):
        batch = family.encode([samples[i] for i in idx], for_generation=True)
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
        ids = family.generate_ids(batch, **kwargs)
        out.extend(family.decode(ids))
    return out


@torch.inference_mode()
def answer_logps(
    family: ModelFamily, samples: Sequence[Sample], *, batch_size: int = 8, progress: bool = False
) -> list[AnswerLogps]:
    """Log-probs of each sample's ``answer`` (answer tokens plus end-of-turn) given image and question."""
    for i, s in enumerate(samples):
        if s.answer is None:
            raise ValueError(f"sample {i} has no answer; answer_logps scores given answers")
    out: list[AnswerLogps] = []
    for idx in tqdm(_batches(len(samples), batch_size), desc="logps", disable=not progress):
        batch = family.encode([samples[i] for i in idx], for_generation=False)
        logits = family.forward(batch)
        logps, mask = token_logps(logits, batch["input_ids"], batch["answer_mask"])
        total, mean = reduce_logps(logps, mask)
        for b in range(len(idx)):
            out.append(AnswerLogps(float(total[b]), float(mean[b]), logps[b][mask[b]].tolist()))
    return out


def first_answer_token(family: ModelFamily, word: str) -> int:
    """Id of the first token of ``word`` when it starts the assistant's answer (template-aware, any tokenizer)."""
    batch = family.encode([Sample(None, "?", word)], for_generation=False)
    pos = batch["answer_mask"][0].nonzero()[0, 0]
    return int(batch["input_ids"][0, pos])


def yes_no_token_ids(family: ModelFamily) -> tuple[list[int], list[int]]:
    """Distinct first-token ids of ("yes", "Yes") and ("no", "No") as answers, cached on the family object."""
    cached = getattr(family, "_yes_no_ids", None)
    if cached is None:
        yes = sorted({first_answer_token(family, w) for w in ("yes", "Yes")})
        no = sorted({first_answer_token(family, w) for w in ("no", "No")})
        if set(yes) & set(no):
            raise ValueError(
                f"the tokenizer of {type(family).__name__} cannot tell yes from no by their first token "
                f"(yes ids {yes}, no ids {no}); the labeler needs distinct answer tokens"
            )
        cached = (yes, no)
        family._yes_no_ids = cached  # type: ignore[attr-defined]
    return cached


@torch.inference_mode()
def yes_no_probs(
    family: ModelFamily, samples: Sequence[Sample], *, batch_size: int = 16, progress: bool = False
) -> list[tuple[float, float]]:
    """(P(yes)+P(Yes), P(no)+P(No)) of the first answer token after each yes/no question (the labeler's read-out)."""
    yes_ids, no_ids = yes_no_token_ids(family)
    out: list[tuple[float, float]] = []
    for idx in tqdm(_batches(len(samples), batch_size), desc="yes/no", disable=not progress):
        batch = family.encode([samples[i] for i in idx], for_generation=True)
        logits = family.forward(batch)  # (B, T, V); left padded, so the next token is predicted at -1
        probs = logits[:, -1].float().softmax(-1)
        p_yes = probs[:, yes_ids].sum(-1)
        p_no = probs[:, no_ids].sum(-1)
        out.extend(zip(p_yes.tolist(), p_no.tolist()))
    return out
