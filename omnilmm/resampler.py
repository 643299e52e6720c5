"""OmniLMM's perceiver resampler: ``num_query`` learned queries cross-attend once to the vision patches.

Matches the published module (keys ``query``, ``pos_embed``, ``kv_proj``, ``attn``, ``ln_q``, ``ln_kv``,
``ln_post``, ``proj``): a fixed 2-D sin-cos position embedding over the query grid is added to the queries and,
bicubically resized to the patch grid, to the keys (not to the values).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """(M, dim) sin-cos embedding of positions ``pos`` (M,): ``[sin(pos * w_k), cos(pos * w_k)]``, w_k = 1e4^(-2k/dim)."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))  # (dim/2,)
    out = np.outer(pos.reshape(-1).astype(np.float64), omega)  # (M, dim/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """(grid*grid, dim) MAE-style 2-D embedding, row-major; first half encodes the column, second half the row.

    As in MAE's ``get_2d_sincos_pos_embed`` (which the original resampler copies): the meshgrid puts w first, so
    the first ``dim/2`` channels embed the x (column) coordinate and the last ``dim/2`` the y (row) coordinate.
    """
    ys, xs = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")  # (grid, grid) each
    emb = np.concatenate([sincos_1d(dim // 2, xs), sincos_1d(dim // 2, ys)], axis=1)
    return torch.from_numpy(emb).float()


def resize_pos_embed(pos: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Bicubically resize a (S*S, D) grid embedding to (M, D) with M = num_tokens a perfect square."""
    src, tgt = math.isqrt(pos.shape[0]), math.isqrt(num_tokens)
    if tgt * tgt != num_tokens:
        raise ValueError(f"the resampler needs a square patch grid, got {num_tokens} patches; use a square image_size")
    if src == tgt:
        return pos
    grid = pos.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)  # (1, D, S, S)
    out = F.interpolate(grid, size=(tgt, tgt), mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).reshape(tgt * tgt, -1).to(pos.dtype)


class Resampler(nn.Module):
    """One cross-attention layer from ``grid**2`` queries to the patch features; output (N, grid**2, embed_dim).

    Args:
        grid_size: side of the query grid (num_query = grid_size**2).
        embed_dim: output width (the LM's hidden size).
        num_heads: attention heads.
        kv_dim: width of the vision features; projected by ``kv_proj`` (no bias) when it differs from embed_dim.
    """

    def __init__(self, grid_size: int, embed_dim: int, num_heads: int, kv_dim: int | None = None) -> None:
        super().__init__()
        self.grid_size, self.embed_dim = grid_size, embed_dim
        self.num_queries = grid_size**2
        # fixed, not trained: a persistent buffer so it is saved under the published key but never optimised
        self.register_buffer("pos_embed", sincos_2d(embed_dim, grid_size), persistent=True)
        self.query = nn.Parameter(torch.zeros(self.num_queries, embed_dim))
        if kv_dim is not None and kv_dim != embed_dim:
            self.kv_proj: nn.Module = nn.Linear(kv_dim, embed_dim, bias=False)
        else:  # as in the original: no projection (and no key) when the widths already agree
            self.kv_proj = nn.Identity()
        self.attn = nn.MultiheadAttention(embed_dim, num_heads)
        self.ln_q = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_post = nn.LayerNorm(embed_dim, eps=1e-6)
        self.proj = nn.Parameter(torch.zeros(embed_dim, embed_dim))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The original initialisation: trunc-normal queries and Linear weights, ``proj ~ N(0, 1/embed_dim)``."""
        nn.init.trunc_normal_(self.query, std=0.02)
        nn.init.normal_(self.proj, std=self.embed_dim**-0.5)
        self.pos_embed.copy_(sincos_2d(self.embed_dim, self.grid_size))
        if isinstance(self.kv_proj, nn.Linear):
            nn.init.trunc_normal_(self.kv_proj.weight, std=0.02)
        for ln in (self.ln_q, self.ln_kv, self.ln_post):
            nn.init.ones_(ln.weight)
            nn.init.zeros_(ln.bias)
        self.attn._reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, L, kv_dim) patch features (prefix tokens removed), L a perfect square -> (N, num_query, embed_dim)."""
        key_pos = resize_pos_embed(self.pos_embed, x.shape[1]).to(x.dtype)  # (L, D)
        x = self.ln_kv(self.kv_proj(x)).permute(1, 0, 2)  # (L, N, D): nn.MultiheadAttention is sequence-first
        n = x.shape[1]
        q = self.ln_q(self.query)  # (Q, D)
        q = q.unsqueeze(1).expand(-1, n, -1) + self.pos_embed.to(q.dtype).unsqueeze(1)  # (Q, N, D)
        out = self.attn(q, x + key_pos.unsqueeze(1), x, need_weights=False)[0]  # (Q, N, D)
        return self.ln_post(out.permute(1, 0, 2)) @ self.proj  # (N, Q, D)
