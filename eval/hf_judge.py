"""A local judge: any Hugging Face instruction-tuned causal LM, batched, so every benchmark can run offline.

Prompts go through the tokenizer's chat template (``add_generation_prompt=True``); decoding is greedy at
temperature 0. A re-ask (``attempt > 0``) at temperature 0 samples at T=0.7 with a seed fixed by the attempt,
since greedy decoding would repeat the unparseable answer word for word.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from eval.cache import JudgeCache
from eval.judges import JudgeRequest, JudgeResponse, JudgeStats, cached_complete
from utils.cuda import resolve_device

logger = logging.getLogger(__name__)

REASK_TEMPERATURE = 0.7


def checkpoint_fingerprint(path: Path) -> str:
    """Short hash of config.json and the weight files' names and sizes: a retrained model at the same path gets
    a new judge id, hence fresh cache entries."""
    h = hashlib.sha256()
    cfg = path / "config.json"
    if cfg.is_file():
        h.update(cfg.read_bytes())
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:12]


class HFJudge:
    """Judge with a local causal LM.

    Example:
        >>> judge = HFJudge("checkpoints/Qwen2.5-7B-Instruct", batch_size=16)  # doctest: +SKIP
        >>> judge.complete([JudgeRequest.chat(user="Rate this ...")])  # doctest: +SKIP
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        batch_size: int = 8,
        dtype: torch.dtype | str | None = None,
        device: str | None = None,
        cache: JudgeCache | None = None,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from muffin.family import resolve_dtype

        path = Path(model_path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"--judge-model '{path}' is not a local checkpoint directory with config.json; "
                "download the judge model first (the hub is not used at scoring time)"
            )
        device = resolve_device(device)
        if dtype is None:
            dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        elif isinstance(dtype, str):
            dtype = resolve_dtype(dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(
                f"the tokenizer of judge '{path}' has no chat template; use an instruction-tuned model "
                "or set tokenizer.chat_template and save it"
            )
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        self.device, self.batch_size = device, batch_size
        self.max_length = getattr(self.model.config, "max_position_embeddings", None)
        self.id = f"hf:{path.resolve().name}:{checkpoint_fingerprint(path)}"
        self.cache, self.stats = cache, JudgeStats()

    def complete(self, requests: Sequence[JudgeRequest], *, progress: bool = False) -> list[JudgeResponse]:
        def call(reqs: list[JudgeRequest]) -> list[JudgeResponse]:
            out: list[JudgeResponse | None] = [None] * len(reqs)
            # batch only requests that decode the same way; keep the input order in the output
            groups: dict[tuple[float, int, int], list[int]] = {}
            for i, r in enumerate(reqs):
                groups.setdefault((r.temperature, r.max_tokens, r.attempt), []).append(i)
            batches = [
                idx[s : s + self.batch_size] for idx in groups.values() for s in range(0, len(idx), self.batch_size)
            ]
            for idx in tqdm(batches, desc=f"judge {self.id}", disable=not progress):
                for i, resp in zip(idx, self._generate([reqs[i] for i in idx])):
                    out[i] = resp
            return out  # type: ignore[return-value]

        return cached_complete(requests, judge_id=self.id, cache=self.cache, stats=self.stats, call=call)

    @torch.inference_mode()
    def _generate(self, reqs: list[JudgeRequest]) -> list[JudgeResponse]:
        texts = [
            self.tokenizer.apply_chat_template(
                [{"role": r, "content": c} for r, c in q.messages], tokenize=False, add_generation_prompt=True
            )
            for q in reqs
        ]
        enc = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        out: list[JudgeResponse | None] = [None] * len(reqs)
        keep = []
        for i, ids in enumerate(enc):
            if self.max_length is not None and len(ids) + reqs[i].max_tokens > self.max_length:
                self.stats.add(errors=1)
                out[i] = JudgeResponse(
                    None,
                    error=f"prompt of {len(ids)} tokens + {reqs[i].max_tokens} new tokens "
                    f"exceeds the judge's context of {self.max_length}; use a judge with a longer "
                    "context or a shorter --prompt-file",
                )
            else:
                keep.append(i)
        if keep:
            for i, resp in zip(keep, self._run([texts[i] for i in keep], reqs[keep[0]])):
                out[i] = resp
        return out  # type: ignore[return-value]

    def _run(self, texts: list[str], req: JudgeRequest) -> list[JudgeResponse]:
        tok = self.tokenizer
        tok.padding_side = "left"
        batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        # RefoMB's published 1e-5 asks an API for near-greedy decoding; sampling at it divides fp16 logits into inf
        asked = req.temperature if req.temperature >= 1e-3 else 0.0
        temperature = asked if asked > 0 else (REASK_TEMPERATURE if req.attempt else 0.0)
        kwargs = {"max_new_tokens": req.max_tokens, "pad_token_id": tok.pad_token_id}
        if temperature > 0:
            torch.manual_seed(int(hashlib.sha256(json.dumps(req.attempt).encode()).hexdigest()[:8], 16))
            kwargs.update(do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
        else:
            kwargs.update(do_sample=False)
        self.stats.add(calls=len(texts))
        ids = self.model.generate(**batch, **kwargs)[:, batch["input_ids"].shape[1] :]  # (B, T_new)
        # instruction models often end a turn with their own token (e.g. <|eot_id|>), listed in generation_config
        stop = self.model.generation_config.eos_token_id
        stop_ids = torch.tensor(sorted({tok.eos_token_id, *(stop if isinstance(stop, list) else [stop])} - {None}))
        out = []
        for row, mask in zip(ids, batch["attention_mask"]):
            eos = torch.isin(row, stop_ids.to(row.device)).nonzero()
            n_new = int(eos[0, 0]) + 1 if len(eos) else len(row)
            text = tok.decode(row[:n_new], skip_special_tokens=True)
            pt = int(mask.sum())
            self.stats.add(prompt_tokens=pt, completion_tokens=n_new)
            out.append(JudgeResponse(text, prompt_tokens=pt, completion_tokens=n_new))
        return out
