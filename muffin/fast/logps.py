"""Answer log-probs: the plain path's per-token log-probs from full logits, and the packed path's chunked
linear + log-softmax (a custom autograd function whose backward recomputes logits chunk by chunk, so no
(tokens x vocabulary) float32 tensor is kept)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


class _ChunkedLogps(torch.autograd.Function):
    """log_softmax(h @ W.T)[label] in chunks of rows; backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
        out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        lse_all = torch.empty_like(out)
        for s in range(0, h.shape[0], chunk):
            logits = h[s : s + chunk] @ weight.T  # (n, V) in the model dtype
            lse = torch.logsumexp(logits.float(), -1)
            out[s : s + chunk] = logits.gather(-1, labels[s : s + chunk, None]).squeeze(-1).float() - lse
            lse_all[s : s + chunk] = lse
        ctx.save_for_backward(h, weight, labels, lse_all)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        h, weight, labels, lse_all = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        for s in range(0, h.shape[0], ctx.chunk):
            hc = h[s : s + ctx.chunk]
            g = grad_out[s : s + ctx.chunk].float()
            probs = torch.exp((hc @ weight.T).float() - lse_all[s : s + ctx.chunk, None])  # (n, V)
            grad_logits = -g[:, None] * probs
            grad_logits.scatter_add_(-1, labels[s : s + ctx.chunk, None], g[:, None])
            if need_h:
                grad_h[s : s + ctx.chunk] = (grad_logits.to(weight.dtype) @ weight).to(h.dtype)
            if need_w:
                grad_w += grad_logits.T @ hc.float()
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None


def target_logps(hidden: torch.Tensor, head: torch.nn.Linear, labels: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """log p(label | hidden) for rows of ``hidden`` (N, H) -> (N,) float32, never materialising all logits.

    Falls back to calling ``head`` (chunked, autograd through it) when its weight is sharded away (ZeRO-3) or the
    head has a bias.
    """
    w = head.weight
    if head.bias is None and w.dim() == 2 and w.shape[1] == hidden.shape[-1]:
        return _ChunkedLogps.apply(hidden, w, labels, chunk)
    outs = []
    for s in range(0, hidden.shape[0], chunk):
        logits = head(hidden[s : s + chunk])
        outs.append(
            logits.gather(-1, labels[s : s + chunk, None]).squeeze(-1).float() - torch.logsumexp(logits.float(), -1)
        )
    return torch.cat(outs)


@dataclass
class SequenceLogps:
    """Differentiable answer log-probs of N samples: per-token (list of (n_i,) tensors), sums and means (N,)."""

    per_token: list[torch.Tensor]
    sums: torch.Tensor
    means: torch.Tensor


def from_flat(flat: torch.Tensor, counts: list[int]) -> SequenceLogps:
    per_token = list(torch.split(flat, counts))
    sums = torch.stack([t.sum() for t in per_token])
    means = sums / torch.tensor(counts, device=flat.device).clamp(min=1)
    return SequenceLogps(per_token, sums, means)
