"""``MiniCPMVFamily``: MiniCPM-Llama3-V 2.5 as labeler (yes/no read-out) and candidate sampler.

By default the checkpoint loads into our own implementation (``omnilmm.minicpmv_model`` and
``omnilmm.minicpmv_processing``): the published safetensors fill it key for key and no code shipped with the
checkpoint runs. ``trust_remote_code=True`` (CLI ``--trust-remote-code``, with ``--revision``) loads the
checkpoint's own Python code instead. Both paths expose the same surface, which is all this family uses:

- ``processor(prompt, images, return_tensors="pt", max_length=None)`` -> ``input_ids`` (1, T) and per-sample
  lists ``pixel_values``, ``tgt_sizes``, ``image_bound`` (images spliced at ``(<image>./</image>)``);
- ``model.get_vllm_embedding(data)`` -> (token embeddings with the image features written in, ...);
- ``model.llm``, the Llama-3 causal LM, for logits and ``generate``.

Batching (left padding, ``image_bound`` shifted by the padding) and the yes/no read-out are ours, so the
generic ``muffin.inference`` helpers (``generate`` with per-sample seeds, ``yes_no_probs``) work unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from muffin.decoding import CANDIDATE_SAMPLING, Decoding
from muffin.family import FastPath, Sample

logger = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "(<image>./</image>)"  # what the remote chat() writes for an image
EOT = "<|eot_id|>"


def _require(obj: Any, attrs: Sequence[str], what: str, revision: str | None) -> None:
    missing = [a for a in attrs if not hasattr(obj, a)]
    if missing:
        raise AttributeError(
            f"the remote {what} (revision {revision or 'default'}) has no {missing}; this family "
            "needs the MiniCPM-Llama3-V 2.5 code that ships processing_minicpmv.py: pin a recent "
            "revision of openbmb/MiniCPM-Llama3-V-2_5"
        )


def _images(image: Any) -> list[Any]:
    """A sample's images as a list: none, one, or several (the original's chat() takes several per message)."""
    return [] if image is None else list(image) if isinstance(image, list | tuple) else [image]


class MiniCPMVFamily:
    """MiniCPM-Llama3-V 2.5 (native, or its own remote code): the paper's labeler and a sampler; DPO runs on it too."""

    name: ClassVar[str] = "minicpmv"
    # The remote chat()'s default (sampling=True): T 0.7, top_p 0.8, top_k 100, repetition penalty 1.05.
    chat_decoding: ClassVar[Decoding] = Decoding(
        max_new_tokens=1024, do_sample=True, temperature=0.7, top_p=0.8, top_k=100, repetition_penalty=1.05
    )
    # RLAIF-V candidate sampling: 10 samples per prompt, T 0.7, up to 512 new tokens.
    sampler_decoding: ClassVar[Decoding] = CANDIDATE_SAMPLING

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        processor: Any,
        *,
        system: str = "",
        max_length: int = 2048,
        revision: str | None = None,
        source: str | Path | None = None,
    ) -> None:
        _require(model, ("llm", "get_vllm_embedding"), "model", revision)
        _require(processor, ("__call__",), "processor", revision)
        self.model, self.tokenizer, self.processor = model, tokenizer, processor
        self.fast = FastPath()  # no shared-prefix hooks: every row runs as its own sequence
        self.system, self.max_length, self.revision, self.source = system, max_length, revision, source
        self.eot_id = tokenizer.convert_tokens_to_ids(EOT)
        if self.eot_id is None or self.eot_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {EOT} token; this is not a MiniCPM-Llama3-V 2.5 tokenizer")
        self.pad_id = 0 if tokenizer.pad_token_id is None else tokenizer.pad_token_id

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        lora_path: str | Path | None = None,
        trust_remote_code: bool = False,
        revision: str | None = None,
        **kwargs: Any,
    ) -> MiniCPMVFamily:
        """Load model, tokenizer and processor: natively, or through the checkpoint's own code when asked.

        Args:
            path: local checkpoint directory (hub ids only with ``trust_remote_code``).
            lora_path: a LoRA checkpoint of ``muffin.train`` to merge (native model only).
            trust_remote_code: run the checkpoint's Python files instead of our implementation (opt-in).
            revision: commit (or tag) of the remote code and weights; only with ``trust_remote_code``.
        """
        if trust_remote_code:
            if lora_path is not None:
                raise ValueError(
                    "lora_path: merging an adapter is supported on the native model only (no remote code)"
                )
            return cls._from_remote_code(path, dtype=dtype, device=device, revision=revision, **kwargs)
        if revision is not None:
            raise ValueError(
                f"revision={revision!r} pins the checkpoint's remote code, which runs only with "
                f"trust_remote_code=True (CLI --trust-remote-code); the native loader reads {path} as it is: "
                "drop the revision or turn remote code on"
            )
        from transformers import PreTrainedTokenizerFast

        from omnilmm.minicpmv_model import load_minicpmv
        from omnilmm.minicpmv_processing import MiniCPMVProcessor

        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(
                f"{path}: no tokenizer.json. MiniCPM-Llama3-V 2.5's tokenizer is a fast (tokenizer.json) Llama-3 "
                "tokenizer: download tokenizer.json, tokenizer_config.json and special_tokens_map.json with the weights"
            )
        model = load_minicpmv(path, dtype=dtype, device=device)
        if lora_path is not None:
            from muffin.hf_vlm.family import merge_lora

            model = merge_lora(model, Path(lora_path)).eval()
        # the published tokenizer_config names the remote MiniCPMVTokenizerFast, a PreTrainedTokenizerFast that only
        # adds id properties: the plain class reads the same files without running code
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path))
        processor = MiniCPMVProcessor.from_pretrained(path, tokenizer, query_num=model.config.query_num)
        return cls(model, tokenizer, processor, source=path, **kwargs)

    @classmethod
    def _from_remote_code(
        cls, path: str | Path, *, dtype: torch.dtype, device: str | torch.device, revision: str | None, **kwargs: Any
    ) -> MiniCPMVFamily:
        from transformers import AutoModel, AutoProcessor, AutoTokenizer

        common = {"trust_remote_code": True, "revision": revision}
        logger.info("loading remote code of %s at revision %s", path, revision or "default")
        tokenizer = AutoTokenizer.from_pretrained(str(path), **common)
        processor = AutoProcessor.from_pretrained(str(path), **common)
        model = AutoModel.from_pretrained(str(path), dtype=dtype, **common)
        model.to(device).eval()
        return cls(model, tokenizer, processor, revision=revision, source=path, **kwargs)

    def save_pretrained(self, path: str | Path) -> None:
        """Save weights, config, tokenizer and processor config; remote-code models also get their Python files."""
        import shutil

        from omnilmm.minicpmv_model import MiniCPMV, save_minicpmv

        path = Path(path)
        src = Path(self.source) if self.source is not None else None
        if isinstance(self.model, MiniCPMV):
            save_minicpmv(self.model, path)
            self.tokenizer.save_pretrained(path)
        else:
            if src is None or not src.is_dir():
                raise FileNotFoundError(
                    f"cannot copy the remote code: source {self.source!r} is not a local directory; "
                    "download the checkpoint first"
                )
            self.model.save_pretrained(path)
            self.tokenizer.save_pretrained(path)
            for f in src.glob("*.py"):
                shutil.copy(f, path / f.name)
        if src is not None and (src / "preprocessor_config.json").is_file():
            shutil.copy(src / "preprocessor_config.json", path / "preprocessor_config.json")

    # ------------------------------------------------------------------ encoding
    def _prompt(self, i: int, s: Sample) -> str:
        if not isinstance(s.question, str) or not s.question.strip():
            raise ValueError(f"sample {i}: empty question; every sample needs a non-empty 'question' string")
        # as the original chat() joins a message's [image, ..., text] parts: one tag per image, then the text
        content = "\n".join([IMAGE_PLACEHOLDER] * len(_images(s.image)) + [s.question])
        msgs = ([{"role": "system", "content": self.system}] if self.system else []) + [
            {"role": "user", "content": content}
        ]
        return self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    def _process(self, i: int, text: str, image: Any) -> dict[str, Any]:
        out = self.processor(text, _images(image) or None, return_tensors="pt", max_length=None)
        ids = out["input_ids"][0]
        if ids.shape[0] >= self.max_length:
            raise ValueError(
                f"sample {i}: {ids.shape[0]} tokens (image slices included), over max_length "
                f"{self.max_length}; shorten the question or raise max_length"
            )
        empty = torch.zeros((0, 2), dtype=torch.long)

        def first(key: str, default: Any) -> Any:
            v = out.get(key) if hasattr(out, "get") else None
            return v[0] if v is not None and len(v) else default

        return {
            "input_ids": ids,
            "pixel_values": list(first("pixel_values", [])),
            "tgt_sizes": first("tgt_sizes", empty),
            "image_bound": first("image_bound", empty),
        }

    def _encode_one(self, i: int, s: Sample, for_generation: bool) -> tuple[dict[str, Any], int]:
        prompt = self._prompt(i, s)
        row = self._process(i, prompt, s.image)
        if for_generation:
            return row, row["input_ids"].shape[0]
        if s.answer is None:
            raise ValueError(f"sample {i}: no answer to encode; pass for_generation=True to encode the prompt only")
        n_prompt = row["input_ids"].shape[0]
        full = self._process(i, prompt + s.answer + EOT, s.image)
        if not torch.equal(full["input_ids"][:n_prompt], row["input_ids"]):
            raise ValueError(f"sample {i}: the answer changes the prompt's tokenisation; cannot locate the answer")
        return full, n_prompt

    def encode(self, samples: Sequence[Sample], *, for_generation: bool = False) -> dict[str, Any]:
        """See ``ModelFamily.encode``; ``pixel_values``/``tgt_sizes``/``image_bound`` are per-sample lists."""
        if not samples:
            raise ValueError("encode() got no samples")
        rows = [self._encode_one(i, s, for_generation) for i, s in enumerate(samples)]
        width = max(r["input_ids"].shape[0] for r, _ in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        ans = torch.zeros((len(rows), width), dtype=torch.bool)
        bounds = []
        for b, (r, n_prompt) in enumerate(rows):
            n = r["input_ids"].shape[0]
            off = width - n if for_generation else 0  # left pad for generation: image positions shift right
            ids[b, off : off + n], attn[b, off : off + n] = r["input_ids"], 1
            ans[b, off + n_prompt : off + n] = True
            bounds.append(r["image_bound"] + off)
        batch: dict[str, Any] = {
            "input_ids": ids,
            "attention_mask": attn,
            "image_bound": bounds,
            "pixel_values": [r["pixel_values"] for r, _ in rows],
            "tgt_sizes": [r["tgt_sizes"] for r, _ in rows],
        }
        if not for_generation:
            batch["answer_mask"] = ans
        return batch

    # ------------------------------------------------------------------ running
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _embed(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self.device
        dtype = self.model.llm.get_input_embeddings().weight.dtype
        data = {
            "input_ids": batch["input_ids"].to(dev),
            "image_bound": batch["image_bound"],
            "pixel_values": [[p.to(dev, dtype) for p in ps] for ps in batch["pixel_values"]],
            "tgt_sizes": [t.to(dev) for t in batch["tgt_sizes"]],
        }
        emb, _ = self.model.get_vllm_embedding(data)  # (B, T, H)
        return emb, batch["attention_mask"].to(dev)

    def forward(self, batch: dict[str, Any], *, model: torch.nn.Module | None = None) -> torch.Tensor:
        """Logits (B, T, V) of the Llama-3 LM on the spliced embeddings; positions follow the attention mask.
        The vision tower and the LM are called directly, so ``model`` (a launcher's wrapper) is not used."""
        emb, mask = self._embed(batch)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        return self.model.llm(inputs_embeds=emb, attention_mask=mask, position_ids=pos, use_cache=False).logits

    def generate_ids(self, batch: dict[str, Any], **generate_kwargs: Any) -> torch.Tensor:
        """New ids (B, T_new), stopping at ``<|eot_id|>`` or EOS, as the remote ``generate`` does."""
        emb, mask = self._embed(batch)
        eos = [i for i in (self.tokenizer.eos_token_id, self.eot_id) if i is not None]
        # generate from embeddings only: the output holds the new tokens only
        return self.model.llm.generate(
            inputs_embeds=emb, attention_mask=mask, pad_token_id=self.pad_id, eos_token_id=eos, **generate_kwargs
        )

    def decode(self, ids: torch.Tensor) -> list[str]:
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    # ------------------------------------------------------------------ training hooks
    def lora_target_modules(self) -> list[str]:
        return [
            n
            for n, m in self.model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.startswith("llm.model.layers.")
        ]

    def trainable_modules(self) -> list[str]:
        return ["resampler"]

    def frozen_modules(self) -> list[str]:
        return ["vpm"]
