"""``OmniLMMForCausalLM``: transformers' Mistral LM + timm EVA02 tower + resampler, spliced at ``<im_patch>``.

State-dict layout is the published one (OmniLMM-12B, RLAIF-V-12B): ``model.embed_tokens``, ``model.layers.*``,
``model.norm``, ``lm_head``, ``model.vision_tower.*``, ``model.resampler.*``; so ``from_pretrained`` reads the
released checkpoints and ``save_pretrained`` writes files the original code can read.

An image enters the text as ``<im_start>`` + ``num_query`` x ``<im_patch>`` + ``<im_end>``; the resampler's
``num_query`` output vectors replace the ``<im_patch>`` embeddings (the markers keep their token embeddings).
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, MistralForCausalLM, MistralModel
from transformers.models.mistral.modeling_mistral import MistralPreTrainedModel

from omnilmm.config import OmniLMMConfig
from omnilmm.resampler import Resampler, sincos_2d
from omnilmm.vision import build_vision_tower, vision_features, vision_width

try:  # transformers v5: init functions that skip tensors already loaded from a checkpoint
    from transformers import initialization as hf_init
except ImportError:  # pragma: no cover - older layouts
    hf_init = torch.nn.init

logger = logging.getLogger(__name__)


class OmniLMMModel(MistralModel):
    """Mistral decoder plus ``vision_tower`` and ``resampler`` (keys ``model.vision_tower.*``, ``model.resampler.*``)."""

    config_class = OmniLMMConfig

    def __init__(self, config: OmniLMMConfig) -> None:
        super().__init__(config)
        config.validate_multimodal("OmniLMM config")
        self.vision_tower = build_vision_tower(config.vision_model_name, config.vision_kwargs)
        self.resampler = Resampler(
            config.query_grid, config.hidden_size, config.resampler_heads, kv_dim=vision_width(self.vision_tower)
        )

    @torch.no_grad()
    def reset_vision_buffers(self) -> None:
        """Rebuild the tower's non-persistent buffers after a meta-device load.

        timm's EVA attention keeps a constant zero key bias (``k_bias``) as a non-persistent buffer: it is in no
        checkpoint, and transformers skips modules whose parameters all loaded, so it would hold garbage.
        """
        for name, module in self.vision_tower.named_modules():
            for buf in module._non_persistent_buffers_set:
                if buf == "k_bias":
                    getattr(module, buf).zero_()
                else:
                    logger.warning(
                        "vision tower buffer %s.%s is not saved in checkpoints and is not rebuilt "
                        "after loading; check it if outputs look wrong",
                        name,
                        buf,
                    )

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, num_query, hidden): penultimate EVA02 block, CLS dropped, resampled."""
        feats = vision_features(self.vision_tower, pixel_values)  # (N, L, C)
        return self.resampler(feats.to(self.resampler.proj.dtype))

    def _image_spans(self, input_ids: torch.Tensor) -> list[list[int]]:
        """Start positions of the ``<im_start>`` markers per row, after checking every span is well formed."""
        cfg = self.config
        ids = (
            getattr(cfg, "im_start_token_id", None),
            getattr(cfg, "im_end_token_id", None),
            getattr(cfg, "im_patch_token_id", None),
        )
        if None in ids:
            raise ValueError(
                "the OmniLMM model does not know its image-marker token ids; set config.im_start_token_id, "
                "im_end_token_id and im_patch_token_id from the tokenizer (OmniLMMFamily does this)"
            )
        start_id, end_id, patch_id = ids
        q = cfg.num_query
        spans: list[list[int]] = []
        for b, row in enumerate(input_ids):
            starts = (row == start_id).nonzero().flatten().tolist()
            n_end = int((row == end_id).sum())
            if len(starts) != n_end:
                raise ValueError(
                    f"batch row {b}: {len(starts)} <im_start> but {n_end} <im_end> markers; every image "
                    f"must be written as <im_start> + {q} x <im_patch> + <im_end>"
                )
            for p in starts:
                ok = p + q + 1 < row.shape[0] and int(row[p + q + 1]) == end_id
                if not ok or not bool((row[p + 1 : p + q + 1] == patch_id).all()):
                    raise ValueError(
                        f"batch row {b}: the <im_start> at position {p} is not followed by exactly {q} "
                        "<im_patch> tokens and an <im_end>; the image span was cut or mistyped"
                    )
            if int((row == patch_id).sum()) != q * len(starts):
                raise ValueError(f"batch row {b}: <im_patch> tokens outside an <im_start>...<im_end> span")
            spans.append(starts)
        return spans

    def embed_with_images(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings (B, T, H) with each image's features written over its ``<im_patch>`` positions.

        Images are consumed in reading order: row 0's spans first, then row 1's, ... (text-only rows take none).
        """
        spans = self._image_spans(input_ids)
        n_spans = sum(len(s) for s in spans)
        emb = self.embed_tokens(input_ids)  # (B, T, H)
        n_img = 0 if pixel_values is None else pixel_values.shape[0]
        if n_spans != n_img:
            raise ValueError(
                f"the batch has {n_spans} image spans in input_ids but {n_img} images in pixel_values; "
                "encode samples and images together (OmniLMMFamily.encode)"
            )
        if n_img == 0:
            return emb
        feats = self.image_features(pixel_values).to(emb.dtype)  # (N, Q, H)
        mask = input_ids == self.config.im_patch_token_id  # (B, T); validated above: exactly the span interiors
        # masked_scatter fills positions in row-major order, i.e. image k goes to the k-th span in reading order
        return emb.masked_scatter(mask.unsqueeze(-1), feats)


class OmniLMMForCausalLM(MistralForCausalLM):
    """The OmniLMM 12B / RLAIF-V 12B model: ``forward(input_ids, attention_mask, pixel_values=...)``.

    Example:
        >>> model = OmniLMMForCausalLM.from_pretrained("checkpoints/RLAIF-V-12B")  # doctest: +SKIP
    """

    config_class = OmniLMMConfig
    _no_split_modules = ["MistralDecoderLayer", "Resampler"]

    def __init__(self, config: OmniLMMConfig) -> None:
        MistralPreTrainedModel.__init__(self, config)  # skip building a plain MistralModel we would throw away
        self.model = OmniLMMModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, Resampler):  # its bare parameters and the fixed position table
            hf_init.trunc_normal_(module.query, std=0.02)
            hf_init.normal_(module.proj, std=module.embed_dim**-0.5)
            hf_init.copy_(module.pos_embed, sincos_2d(module.embed_dim, module.grid_size))

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """``PreTrainedModel.from_pretrained``, then the vision tower's non-persistent buffers are rebuilt."""
        out = super().from_pretrained(*args, **kwargs)
        (out[0] if isinstance(out, tuple) else out).model.reset_vision_buffers()
        return out

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """Mistral's forward; with ``pixel_values`` (N, 3, S, S) the images are spliced into the embeddings."""
        if inputs_embeds is None and input_ids is not None:
            has_patch = bool((input_ids == getattr(self.config, "im_patch_token_id", -1)).any())
            if pixel_values is not None or (has_patch and input_ids.shape[1] > 1):
                # (a one-token decoding step never carries an image; a prompt with spans but no images is an error)
                inputs_embeds = self.model.embed_with_images(input_ids, pixel_values)
                input_ids = None
        return super().forward(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, **kwargs
        )

    def prepare_inputs_for_generation(
        self, *args: Any, pixel_values: torch.Tensor | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        """Pass ``pixel_values`` on the prefill step only (later steps reuse the cache)."""
        inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        first = kwargs.get("is_first_iteration")
        if first is None:  # transformers versions without the flag: prefill <=> nothing cached yet
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            first = cache is None or cache.get_seq_length() == 0
        if first and pixel_values is not None:
            inputs["pixel_values"] = pixel_values
        else:
            inputs.pop("pixel_values", None)
        return inputs


def _generation_signature() -> inspect.Signature:
    """Mistral's ``prepare_inputs_for_generation`` parameters plus ``pixel_values``. ``generate`` checks the kwargs it
    is given (a cache passed in, ``muffin.fast.generation``) against this signature; the override above takes ``*args,
    **kwargs`` so as to work with both of transformers' names for the cache (``past_key_values``, later ``cache``)."""
    sig = inspect.signature(MistralForCausalLM.prepare_inputs_for_generation)
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    rest = [p for p in sig.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
    pixel = inspect.Parameter("pixel_values", inspect.Parameter.KEYWORD_ONLY, default=None)
    return sig.replace(parameters=[*params, pixel, *rest])


OmniLMMForCausalLM.prepare_inputs_for_generation.__signature__ = _generation_signature()  # type: ignore[attr-defined]

AutoConfig.register("omnilmm", OmniLMMConfig, exist_ok=True)
AutoModelForCausalLM.register(OmniLMMConfig, OmniLMMForCausalLM, exist_ok=True)
