"""MiniCPM-Llama3-V 2.5 built natively: SigLIP-so400m tower (``vpm``), 2-D resampler, Llama-3 LM (``llm``).

Module names and parameter shapes are those of ``openbmb/MiniCPM-Llama3-V-2_5``'s weights (``vpm.*``,
``resampler.*``, ``llm.*``), so its safetensors load key for key without running the checkpoint's own code.
``MiniCPMVConfig`` reads the published ``config.json`` and refuses one that lacks a size (never a default size).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.idefics2.configuration_idefics2 import Idefics2VisionConfig
from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionTransformer

# config.json keys that size the model: a config without one of them is refused, never filled with a default
TEXT_SIZE_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
)
VISION_SIZE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size")
# the Llama fields of the published (flat, LlamaConfig-derived) config.json that the LM is built from
TEXT_KEYS = (
    *TEXT_SIZE_KEYS,
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "attention_bias",
    "attention_dropout",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "pretraining_tp",
    "initializer_range",
    "mlp_bias",
    "head_dim",
)


@dataclass
class MiniCPMVConfig:
    """The published ``config.json`` split into the LM's and the tower's configs; ``raw`` is saved back unchanged."""

    text: LlamaConfig
    vision: Idefics2VisionConfig
    query_num: int
    slice_mode: bool
    batch_vision_input: bool
    drop_vision_last_layer: bool
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> MiniCPMVConfig:
        missing = [k for k in (*TEXT_SIZE_KEYS, "query_num", "vision_config") if k not in raw]
        if missing:
            hint = " (this checkpoint ships its own code: pass trust_remote_code=True)" if "auto_map" in raw else ""
            raise ValueError(
                f"{source}: MiniCPM-Llama3-V 2.5 config has no {missing}; every size must be given, none is "
                f"defaulted. Use the checkpoint's published config.json{hint}."
            )
        vision = dict(raw["vision_config"])
        missing = [k for k in VISION_SIZE_KEYS if k not in vision] + (
            ["image_size"] if "image_size" not in vision else []
        )
        if missing:
            raise ValueError(f"{source}: vision_config has no {missing}; copy them from the published config.json")
        if vision.get("model_type", "idefics2") != "idefics2":
            raise ValueError(
                f"{source}: vision_config.model_type is {vision['model_type']!r}; MiniCPM-Llama3-V 2.5's tower is "
                "the Idefics2 (SigLIP-so400m NaViT) vision transformer, model_type 'idefics2'"
            )
        vision.pop("model_type", None)
        text = {k: raw[k] for k in TEXT_KEYS if k in raw}
        return cls(
            text=LlamaConfig(**text),
            vision=Idefics2VisionConfig(**vision),
            query_num=int(raw["query_num"]),
            slice_mode=bool(raw.get("slice_mode", True)),
            batch_vision_input=bool(raw.get("batch_vision_input", True)),
            drop_vision_last_layer=bool(raw.get("drop_vision_last_layer", False)),
            raw=dict(raw),
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> MiniCPMVConfig:
        cfg = Path(path) / "config.json"
        return cls.from_dict(json.loads(cfg.read_text()), str(cfg))


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """(H, W, dim) ``[sin(pos * w_k), cos(pos * w_k)]``, w_k = 1e4^(-2k/dim), in float32 as the original computes."""
    omega = np.arange(dim // 2, dtype=np.float32)
    omega /= dim / 2.0
    omega = 1.0 / 10000**omega  # (dim/2,)
    out = np.einsum("hw,d->hwd", pos, omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=-1)


def sincos_2d(dim: int, height: int, width: int) -> torch.Tensor:
    """(height, width, dim) 2-D sin-cos table: the first half of the channels encodes the column, the second the row.

    The original builds its meshgrid with w first and embeds ``grid[0]`` (the column index) into the first half;
    the table does not depend on its size, so a (h, w) slice equals the original's cached (70, 70)[:h, :w].
    """
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    cols = np.broadcast_to(np.arange(width, dtype=np.float32)[None, :], (height, width))
    rows = np.broadcast_to(np.arange(height, dtype=np.float32)[:, None], (height, width))
    return torch.from_numpy(np.concatenate([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], axis=-1))


class MiniCPMVResampler(nn.Module):
    """``num_queries`` learned queries cross-attend once to each slice's patches (keys carry a 2-D sin-cos position).

    Unlike OmniLMM's resampler (``omnilmm/resampler.py``) the queries carry no position and the key positions are
    the (h, w) prefix of one sin-cos table, read per slice from its ``tgt_sizes`` row: no interpolation.
    """

    def __init__(self, num_queries: int, embed_dim: int, num_heads: int, kv_dim: int) -> None:
        super().__init__()
        self.num_queries, self.embed_dim = num_queries, embed_dim
        self.query = nn.Parameter(torch.zeros(num_queries, embed_dim))
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim != embed_dim else nn.Identity()
        self.attn = nn.MultiheadAttention(embed_dim, num_heads)  # sequence-first, as the original
        self.ln_q = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_post = nn.LayerNorm(embed_dim, eps=1e-6)
        self.proj = nn.Parameter(embed_dim**-0.5 * torch.randn(embed_dim, embed_dim))
        nn.init.trunc_normal_(self.query, std=0.02)  # the original's init (fresh models only: loads overwrite it)
        if isinstance(self.kv_proj, nn.Linear):
            nn.init.trunc_normal_(self.kv_proj.weight, std=0.02)
        self._table: torch.Tensor | None = None  # cached sin-cos table, grown on demand (not a weight)

    def _positions(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        t = self._table
        if t is None or t.shape[0] < height or t.shape[1] < width or t.device != device:
            h, w = max(height, 0 if t is None else t.shape[0]), max(width, 0 if t is None else t.shape[1])
            self._table = t = sincos_2d(self.embed_dim, h, w).to(device)
        return t

    def forward(self, x: torch.Tensor, tgt_sizes: torch.Tensor) -> torch.Tensor:
        """x (N, L, kv_dim) patch features (rows padded past h*w), tgt_sizes (N, 2) patch grid (h, w) -> (N, Q, D)."""
        n = x.shape[0]
        sizes = [(int(h), int(w)) for h, w in tgt_sizes.tolist()]
        lengths = torch.tensor([h * w for h, w in sizes], device=x.device)
        table = self._positions(max(h for h, _ in sizes), max(w for _, w in sizes), x.device)
        pos = torch.zeros(n, x.shape[1], self.embed_dim, device=x.device, dtype=x.dtype)
        for i, (h, w) in enumerate(sizes):
            pos[i, : h * w] = table[:h, :w].reshape(h * w, -1).to(x.dtype)  # row-major over the slice's grid
        pad = torch.arange(x.shape[1], device=x.device)[None, :] >= lengths[:, None]  # (N, L) True = padding
        kv = self.ln_kv(self.kv_proj(x))  # (N, L, D)
        q = self.ln_q(self.query).unsqueeze(1).expand(-1, n, -1)  # (Q, N, D)
        out = self.attn(q, (kv + pos).transpose(0, 1), kv.transpose(0, 1), key_padding_mask=pad)[0]  # (Q, N, D)
        return self.ln_post(out.transpose(0, 1)) @ self.proj  # (N, Q, D)


class MiniCPMV(nn.Module):
    """The native model: ``vpm`` (Idefics2/SigLIP tower), ``resampler`` and ``llm`` (``LlamaForCausalLM``).

    ``get_vllm_embedding(data)`` has the original's contract, so ``MiniCPMVFamily`` runs this model and the
    checkpoint's own code the same way: ``data`` holds ``input_ids`` (B, T) and per-sample lists ``pixel_values``
    (each slice (3, patch, h*w*patch), patches laid side by side), ``tgt_sizes`` (S, 2) and ``image_bound`` (S, 2).
    """

    def __init__(self, config: MiniCPMVConfig) -> None:
        super().__init__()
        self.config = config
        self.llm = LlamaForCausalLM(config.text)
        self.vpm = Idefics2VisionTransformer(config.vision)
        if config.drop_vision_last_layer:
            self.vpm.encoder.layers = self.vpm.encoder.layers[:-1]
        hidden = config.text.hidden_size
        self.resampler = MiniCPMVResampler(config.query_num, hidden, hidden // 128, config.vision.hidden_size)

    def encode_slices(self, slices: list[torch.Tensor], tgt_sizes: torch.Tensor) -> torch.Tensor:
        """(S, Q, D) resampled features of the S slices of one sample's images, in the LM's dtype (as the original).

        The slices go through the tower together exactly as the published code (hub revision 45208262) sends them:
        patch rows zero-padded to the longest slice, with a patch mask that is all True, because its
        ``patch_attn_mask[i, :h*w] = True`` on a (S, 1, L) mask fills the whole row. So the tower attends to the
        padding and its NaViT position buckets run over L patches in one row; only the resampler masks the padding.
        (MiniCPM-V 2.6 fixed the indexing; 2.5's weights are used with this behaviour, so we keep it.) Call it per
        sample, as ``get_vllm_embedding`` does, so a sample's features never depend on the rest of its batch.
        """
        if not self.config.batch_vision_input:  # the original's per-slice loop: each slice alone, no padding
            return torch.cat([self._tower([s], t[None]) for s, t in zip(slices, tgt_sizes)])
        return self._tower(slices, tgt_sizes)

    def _tower(self, slices: list[torch.Tensor], tgt_sizes: torch.Tensor) -> torch.Tensor:
        dtype = self.llm.get_input_embeddings().weight.dtype
        patch = self.config.vision.patch_size
        flat = [s.flatten(end_dim=1).transpose(0, 1) for s in slices]  # (h*w*patch, 3*patch) each
        strips = nn.utils.rnn.pad_sequence(flat, batch_first=True)  # (S, Lmax*patch, 3*patch)
        n, width, _ = strips.shape
        pixels = strips.transpose(1, 2).reshape(n, 3, patch, width)  # (S, 3, patch, Lmax*patch)
        mask = torch.ones(n, 1, width // patch, dtype=torch.bool, device=pixels.device)  # all True: see above
        feats = self.vpm(pixels.to(dtype), patch_attention_mask=mask).last_hidden_state  # (S, Lmax, C)
        return self.resampler(feats, tgt_sizes)

    def get_vllm_embedding(self, data: dict[str, Any]) -> tuple[torch.Tensor, list[Any]]:
        """Token embeddings (B, T, D) with each slice's features written over its ``image_bound`` range."""
        emb = self.llm.get_input_embeddings()(data["input_ids"])  # (B, T, D)
        out = []
        for b, pixels in enumerate(data["pixel_values"]):
            pixels = list(pixels)
            sizes = torch.as_tensor(data["tgt_sizes"][b]).reshape(-1, 2).long()
            bounds = torch.as_tensor(data["image_bound"][b]).reshape(-1, 2).tolist()
            if not (len(pixels) == sizes.shape[0] == len(bounds)):
                raise ValueError(
                    f"sample {b}: {len(pixels)} image slices, {sizes.shape[0]} tgt_sizes rows and {len(bounds)} "
                    "image_bound ranges; the prompt must hold one <image>...</image> placeholder per slice (the "
                    "processor writes them)"
                )
            if not pixels:
                out.append([])
                continue
            vis = self.encode_slices(pixels, sizes).to(emb.dtype)  # (S, Q, D)
            for (s, e), v in zip(bounds, vis):
                if e - s != v.shape[0]:
                    raise ValueError(f"sample {b}: image_bound ({s}, {e}) spans {e - s} tokens, not {v.shape[0]}")
                emb[b, s:e] = v
            out.append(vis)
        return emb, out

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


def build_empty(config: MiniCPMVConfig) -> MiniCPMV:
    """The model with its parameters on the meta device (no memory) and its buffers (rotary tables) real."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return MiniCPMV(config)


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory: the shards its index names, or ``model.safetensors``."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [path / n for n in names]
    else:
        files = [path / "model.safetensors"]
    absent = [f.name for f in files if not f.is_file()]
    if absent:
        raise FileNotFoundError(
            f"{path}: weight file(s) {absent} missing; download every shard of the checkpoint "
            "(e.g. `huggingface-cli download openbmb/MiniCPM-Llama3-V-2_5 --local-dir ...`)"
        )
    return files


def load_minicpmv(
    path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> MiniCPMV:
    """Build from ``config.json`` and fill every parameter from the safetensors, key for key.

    A key the model lacks, a parameter no file holds, or a shape that differs is an error naming the keys.
    Each tensor goes straight from its file to ``device`` in ``dtype``; nothing is initialised twice.
    """
    from safetensors import safe_open

    path = Path(path)
    model = build_empty(MiniCPMVConfig.from_pretrained(path))
    expected = {k: v.shape for k, v in model.state_dict().items()}
    seen: set[str] = set()
    unexpected: list[str] = []
    for file in weight_files(path):
        sd = {}
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for key in f.keys():
                if key not in expected:
                    unexpected.append(key)
                    continue
                t = f.get_tensor(key)
                if tuple(t.shape) != tuple(expected[key]):
                    raise ValueError(
                        f"{file.name}: {key} has shape {tuple(t.shape)}, the config builds {tuple(expected[key])}; "
                        "config.json and the weights are from different models"
                    )
                sd[key] = t.to(dtype) if t.is_floating_point() else t
        model.load_state_dict(sd, strict=False, assign=True)
        seen.update(sd)
    missing = sorted(set(expected) - seen)
    if missing or unexpected:
        raise KeyError(
            f"{path}: the weights do not match MiniCPM-Llama3-V 2.5 built from its config.json: "
            f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''} ({len(missing)}), "
            f"unexpected {sorted(unexpected)[:8]} ({len(unexpected)})"
        )
    return model.to(device).eval()


def save_minicpmv(model: MiniCPMV, path: str | Path) -> None:
    """Write ``config.json`` (the published one, as read) and ``model.safetensors`` under the published key names."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(model.config.raw, indent=2) + "\n")
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
