"""Tiny ``MiniCPMV`` model with the public interface of MiniCPM-Llama3-V 2.5's remote code.

Public surface mirrored: ``llm`` (a ``LlamaForCausalLM``), ``vpm`` (vision encoder over patch strips),
``resampler(x, tgt_sizes)``, ``get_vllm_embedding(data)`` (data: ``input_ids``, per-sample lists ``pixel_values``,
``tgt_sizes``, ``image_bound``), ``forward(data, **kwargs)``, ``generate(model_inputs, tokenizer=..., **kwargs)``
and ``chat(image, msgs, tokenizer, ...)``. The internals (one-layer vision encoder, one-layer resampler) are toys.
"""

from __future__ import annotations

import json
from copy import deepcopy
from typing import Any

import torch
from PIL import Image
from torch import nn
from transformers import AutoProcessor, LlamaForCausalLM, LlamaPreTrainedModel
from transformers.modeling_outputs import BaseModelOutput

from .configuration_minicpm import MiniCPMVConfig


class TinyVisionEncoder(nn.Module):
    """Patch embedding over (B, 3, patch, L*patch) strips + learned positions + one transformer layer."""

    def __init__(self, config: MiniCPMVConfig) -> None:
        super().__init__()
        d, p = config.vision_hidden_size, config.patch_size
        self.embed_dim, self.patch_size = d, p
        self.patch_embed = nn.Conv2d(3, d, kernel_size=p, stride=p)
        self.pos = nn.Embedding((config.image_size // p) ** 2, d)
        self.layer = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=2 * d, batch_first=True)

    def forward(self, pixel_values: torch.Tensor, patch_attention_mask: torch.Tensor | None = None) -> BaseModelOutput:
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)  # (B, L, d)
        x = x + self.pos(torch.arange(x.shape[1], device=x.device))
        pad = None if patch_attention_mask is None else ~patch_attention_mask.view(x.shape[0], -1)
        return BaseModelOutput(last_hidden_state=self.layer(x, src_key_padding_mask=pad))


class TinyResampler(nn.Module):
    """``query_num`` learned queries attend to the patch features -> (N, query_num, hidden)."""

    def __init__(self, num_queries: int, embed_dim: int, kv_dim: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(num_queries, embed_dim) * 0.02)
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False)
        self.attn = nn.MultiheadAttention(embed_dim, 2, batch_first=True)
        self.ln_post = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor, tgt_sizes: torch.Tensor) -> torch.Tensor:
        n_valid = (tgt_sizes[:, 0] * tgt_sizes[:, 1]).tolist()
        pad = torch.arange(x.shape[1], device=x.device)[None, :] >= torch.tensor(n_valid, device=x.device)[:, None]
        kv = self.kv_proj(x)
        q = self.query.unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.ln_post(self.attn(q, kv, kv, key_padding_mask=pad, need_weights=False)[0])


class MiniCPMVPreTrainedModel(LlamaPreTrainedModel):
    config_class = MiniCPMVConfig


class MiniCPMV(MiniCPMVPreTrainedModel):
    """The model class named by ``auto_map["AutoModel"]``."""

    def __init__(self, config: MiniCPMVConfig) -> None:
        super().__init__(config)
        self.llm = LlamaForCausalLM(config)
        self.vpm = TinyVisionEncoder(config)
        self.resampler = TinyResampler(config.query_num, config.hidden_size, config.vision_hidden_size)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    def get_vllm_embedding(self, data: dict[str, Any]) -> tuple[torch.Tensor, list[Any]]:
        """Token embeddings with each image's resampled features scattered over its ``image_bound`` ranges."""
        device = self.llm.model.embed_tokens.weight.device
        dtype = self.llm.model.embed_tokens.weight.dtype
        if "vision_hidden_states" in data:
            vision_hidden_states = data["vision_hidden_states"]
        else:
            strips, counts = [], []
            for per_sample in data["pixel_values"]:
                counts.append(len(per_sample))
                strips.extend(p.flatten(end_dim=1).permute(1, 0) for p in per_sample)  # (L*p, 3*p)
            vision_hidden_states = [[] for _ in counts]
            if strips:
                tgt = torch.vstack([t for t in data["tgt_sizes"] if len(t)]).to(device).int()
                padded = torch.nn.utils.rnn.pad_sequence(strips, batch_first=True).to(device, dtype)
                b, length, _ = padded.shape
                padded = padded.permute(0, 2, 1).reshape(b, 3, -1, length)  # back to (B, 3, p, L*p) strips
                n_max = int((tgt[:, 0] * tgt[:, 1]).max())
                mask = torch.arange(n_max, device=device)[None, :] < (tgt[:, 0] * tgt[:, 1])[:, None]
                feats = self.resampler(self.vpm(padded, patch_attention_mask=mask).last_hidden_state, tgt)
                start = 0
                for i, n in enumerate(counts):
                    vision_hidden_states[i] = feats[start : start + n] if n else []
                    start += n
        emb = self.llm.model.embed_tokens(data["input_ids"].to(device))  # (B, T, H)
        for i, bounds in enumerate(data["image_bound"]):
            hs = vision_hidden_states[i]
            if len(hs) and len(bounds):
                idx = torch.cat([torch.arange(int(s), int(e)) for s, e in bounds]).to(device)
                emb[i] = emb[i].index_copy(0, idx, hs.reshape(-1, hs.shape[-1]).to(emb.dtype))
        return emb, vision_hidden_states

    def forward(self, data: dict[str, Any], **kwargs: Any) -> Any:
        emb, _ = self.get_vllm_embedding(data)
        return self.llm(input_ids=None, position_ids=data.get("position_ids"), inputs_embeds=emb, **kwargs)

    def _terminators(self, tokenizer: Any) -> list[int]:
        return [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|eot_id|>")]

    def _decode_text(self, result_ids: torch.Tensor, tokenizer: Any) -> list[str]:
        out = []
        for row in result_ids:
            row = row[row != 0]
            row = row[~torch.isin(row, torch.tensor(self._terminators(tokenizer)))]
            out.append(tokenizer.decode(row, skip_special_tokens=True).strip())
        return out

    def generate(
        self,
        model_inputs: dict[str, Any],
        tokenizer: Any = None,
        vision_hidden_states: Any = None,
        stream: bool = False,
        decode_text: bool = False,
        **kwargs: Any,
    ) -> Any:
        """``llm.generate`` on the spliced embeddings; new ids only (or their text with ``decode_text``)."""
        data = dict(model_inputs)
        if vision_hidden_states is not None:
            data["vision_hidden_states"] = vision_hidden_states
        with torch.inference_mode():
            emb, _ = self.get_vllm_embedding(data)
            mask = data.get("attention_mask")
            out = self.llm.generate(
                inputs_embeds=emb,
                attention_mask=None if mask is None else mask.to(emb.device),
                pad_token_id=0,
                eos_token_id=self._terminators(tokenizer),
                **kwargs,
            )
        if decode_text:
            return self._decode_text(out, tokenizer)
        return out

    def chat(
        self,
        image: Image.Image | None,
        msgs: list[dict[str, Any]] | str,
        tokenizer: Any,
        processor: Any = None,
        vision_hidden_states: Any = None,
        max_new_tokens: int = 1024,
        sampling: bool = True,
        max_inp_length: int = 2048,
        system_prompt: str = "",
        stream: bool = False,
        **kwargs: Any,
    ) -> str:
        """One answer for ``msgs`` (the first user turn gets ``image``), with the real code's default decoding."""
        if processor is None:
            processor = AutoProcessor.from_pretrained(self.config._name_or_path, trust_remote_code=True)
        msgs = json.loads(msgs) if isinstance(msgs, str) else deepcopy(msgs)
        images = []
        if image is not None:
            images.append(image)
            msgs[0]["content"] = "(<image>./</image>)\n" + msgs[0]["content"]
        if system_prompt:
            msgs = [{"role": "system", "content": system_prompt}] + msgs
        prompt = processor.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        inputs = processor(prompt, images or None, return_tensors="pt", max_length=max_inp_length)
        config = (
            {"top_p": 0.8, "top_k": 100, "temperature": 0.7, "do_sample": True, "repetition_penalty": 1.05}
            if sampling
            else {"num_beams": 3, "repetition_penalty": 1.2}
        )
        config.update((k, kwargs[k]) for k in config.keys() & kwargs.keys())
        return self.generate(
            inputs,
            tokenizer=tokenizer,
            max_new_tokens=max_new_tokens,
            vision_hidden_states=vision_hidden_states,
            decode_text=True,
            **config,
        )[0]
