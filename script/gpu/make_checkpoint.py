"""Save a random-weight checkpoint of a released model's shape (LLaVA 1.5 7B, OmniLMM 12B) for the full-size run.

    python -m script.gpu.make_checkpoint --shape 7b --out runs/gpu/llava7b-random        # on a GPU (bf16, ~14 GB)
    python -m script.gpu.make_checkpoint --shape omni12b --out runs/gpu/omni12b-random   # on a GPU (bf16, ~23 GB)
    python -m script.gpu.make_checkpoint --shape tiny --out /tmp/llava-tiny-random        # CPU smoke run, seconds
    python -m script.gpu.make_checkpoint --shape omni-tiny --out /tmp/omni-tiny-random    # CPU smoke run, seconds

7b is ``script.bench.common``'s shape (CLIP ViT-L/14-336, Llama-2-7B body, 32064 vocabulary rows); omni12b is
OmniLMM-12B's published config (``OMNILMM_12B``: EVA02-enormous tower, resampler, Zephyr-7B (Mistral) body, 32009
rows). Each is saved by its family's ``save_pretrained``, so ``muffin.load_family`` reads it as it reads a released
checkpoint. The tokenizer is a small offline BPE whose ids are a subset of the rows; the saved generation config
suppresses the rows it has no token for, so sampled answers decode to text (about one token in 600 is ``</s>``:
answers of a few hundred tokens, as real ones) while every forward pass still computes all the logits. OmniLMM's
tokenizer differs from LLaVA's where its family needs it: the ``<im_start>``/``<im_end>``/``<im_patch>`` markers
instead of ``<image>`` (also suppressed: a released model never writes them), ``<s>`` added by the tokenizer (the
Zephyr chat template writes none), padding with ``</s>`` (published ``pad_token_id`` 2). A random model reads out
nearly the same yes/no probabilities for every question (its last position is the same assistant-turn token), which
leaves every answer of a prompt with one score and the pipeline with no pairs; ``spread_yes_no`` moves the yes and no
rows of the output layer apart along a direction orthogonal to that common state, so the verdicts follow the question.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from muffin.family import ModelFamily, Sample
from muffin.inference import yes_no_probs, yes_no_token_ids
from omnilmm.tiny import TINY_VISION
from script.bench.common import CLIP_L336, SHAPES, WORDS, random_model

LLAVA_VISION = {
    "7b": CLIP_L336,
    "tiny": dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2),
}
LLAVA_TEXT = {
    "7b": SHAPES["7b"],  # the benchmarks' sizes
    "tiny": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4),
}
# OmniLMM 12B's architecture as openbmb/OmniLMM-12B's config.json publishes it (RLAIF-V-12B has the same sizes):
# Zephyr-7B-beta's Mistral body, 32000 sentencepiece ids + 9 added tokens, 256 resampler queries over 448-px images.
# The vision tower is timm's eva02_enormous_patch14_clip_224 at its own sizes (config "mm_vision_tower"
# eva02_enormous_patch14_clip_224.laion2b_plus: the architecture and its pretrained tag).
OMNILMM_12B: dict[str, Any] = dict(
    vocab_size=32009,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    hidden_act="silu",
    max_position_embeddings=32768,
    rope_theta=10000.0,
    sliding_window=4096,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    num_query=256,
    image_size=448,
    vision_model_name="eva02_enormous_patch14_clip_224",
)
# the same recipe at toy widths (2 LM layers, a 2-block tower, 4 queries over 56-px images), every other field as 12B
OMNILMM_TINY: dict[str, Any] = {
    **OMNILMM_12B,
    **dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    **dict(max_position_embeddings=4096, sliding_window=None, num_query=4, image_size=56),
    "vision_kwargs": dict(TINY_VISION),  # the 2-block tower of omnilmm.tiny
}
FAMILY = {"7b": "llava", "tiny": "llava", "omni12b": "omnilmm", "omni-tiny": "omnilmm"}  # --shape -> model family
OMNILMM_SIZES = {"omni12b": OMNILMM_12B, "omni-tiny": OMNILMM_TINY}
# the offline tokenizer learns its merges from the words the random answers and the changeq questions are made of
CORPUS = [" ".join(WORDS[i:] + WORDS[:i]) + "." for i in range(len(WORDS))] * 5


def family_of(shape: str) -> str:
    """The model family of ``shape``; an unknown shape is refused with the list of known ones."""
    if shape not in FAMILY:
        raise ValueError(f"unknown shape '{shape}'. Available: {', '.join(FAMILY)}.")
    return FAMILY[shape]


def offline_tokenizer(family: str) -> Any:
    """The small offline BPE of ``family`` (600 learned ids, then the family's special tokens), ids 0-2 ``<unk>``,
    ``<s>``, ``</s>`` as in both released tokenizers."""
    if family == "llava":
        from llava.tiny import tiny_llava_tokenizer

        return tiny_llava_tokenizer(corpus=CORPUS, vocab_size=600)
    from omnilmm.tiny import tiny_omnilmm_tokenizer

    # <s> prepended as Mistral's tokenizer does: the family tokenises the rendered chat, which has none
    return tiny_omnilmm_tokenizer(corpus=CORPUS, vocab_size=600)


def model_config(shape: str, tok: Any) -> Any:
    """The transformers config of ``shape`` with ``tok``'s special ids (the vocabulary keeps the shape's rows)."""
    if family_of(shape) == "llava":
        from script.bench.common import llava15_config

        return llava15_config(tok, LLAVA_TEXT[shape], LLAVA_VISION[shape])
    from omnilmm.config import OmniLMMConfig

    return OmniLMMConfig(
        **OMNILMM_SIZES[shape],
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        architectures=["OmniLMMForCausalLM"],
    )


def random_family(
    shape: str, *, seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> ModelFamily:
    """The random model of ``shape``, built directly on ``device`` in ``dtype``, in its family with its tokenizer."""
    family = family_of(shape)
    tok = offline_tokenizer(family)
    cfg = model_config(shape, tok)
    if family == "llava":
        from transformers import LlavaForConditionalGeneration

        model_class = LlavaForConditionalGeneration
    else:
        from omnilmm.modeling import OmniLMMForCausalLM

        model_class = OmniLMMForCausalLM
    model = random_model(model_class, cfg, dtype=dtype, device=device, seed=seed)
    # the resampler's sin-cos table is made from numpy (on the CPU) whatever the device context: move it along. Only
    # the device: buffers kept in float32 on purpose (the rotary inv_freq) must stay so, as from_pretrained keeps them
    model = model.to(device).eval()
    if family == "llava":
        from llava.family import LlavaFamily
        from llava.preprocess import make_image_processor

        fam: ModelFamily = LlavaFamily(model, tok, make_image_processor(336))
        never = []
    else:
        from omnilmm.config import IM_END, IM_PATCH, IM_START
        from omnilmm.family import OmniLMMFamily

        fam = OmniLMMFamily(model, tok)  # also writes the image-marker ids into the config
        never = tok.convert_tokens_to_ids([IM_START, IM_END, IM_PATCH])
    vocab = model.get_output_embeddings().weight.shape[0]
    # rows past the tokenizer's vocabulary decode to nothing: never sample them (the logits are still computed)
    model.generation_config.suppress_tokens = sorted(never) + list(range(len(tok), vocab))
    model.generation_config.pad_token_id = tok.pad_token_id
    return fam


@torch.no_grad()
def spread_yes_no(
    fam: ModelFamily, *, seed: int = 0, images: list[Path] = (), per_image: int = 16, logit_std: float = 2.0
) -> None:
    """Set the output rows of the yes ids to ``u + v`` and of the no ids to ``u - v`` (``u``: the first yes row;
    ``v``: random, orthogonal to the mean read-out state of yes/no questions about ``images`` (4 random ones when
    empty; the image moves that state far more than the question does, so pass the run's own), scaled so that the
    yes-no logit gap has a standard deviation of ``logit_std`` over them). The states are the output layer's inputs
    while ``muffin.inference.yes_no_probs`` runs, the labeler's own path. Equal group sizes keep it unbiased."""
    yes, no = yes_no_token_ids(fam)
    if len(yes) != len(no):
        raise ValueError(f"yes ids {yes} and no ids {no} differ in number; the read-out would be biased")
    rng = np.random.default_rng(seed)
    samples = []
    pictures = [Image.open(p).convert("RGB") for p in images] or [
        Image.fromarray(rng.integers(0, 255, (336, 336, 3), dtype=np.uint8)) for _ in range(4)
    ]
    for image in pictures:
        # shaped like the rule-based changeq's questions about the policy's sampled claims
        samples += [
            Sample(image, f"Is it true that {' '.join(rng.choice(WORDS, int(rng.integers(4, 20))))}?")
            for _ in range(per_image)
        ]
    head = fam.model.get_output_embeddings()
    states: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, args, _o: states.append(args[0].reshape(-1, args[0].shape[-1])))
    try:
        yes_no_probs(fam, samples, batch_size=len(samples))
    finally:
        hook.remove()
    h = torch.cat(states).float()  # (N, H)
    h0 = h.mean(0)
    v = torch.randn(h.shape[1], generator=torch.Generator().manual_seed(seed)).to(h)
    v -= (v @ h0) / (h0 @ h0) * h0
    v *= logit_std / (2 * (h @ v).std().clamp_min(1e-6))
    w = head.weight
    u = w[yes[0]].float().clone()
    for i in yes:
        w[i] = (u + v).to(w.dtype)
    for i in no:
        w[i] = (u - v).to(w.dtype)
    gap = (h @ (2 * v)).tolist()
    print(f"yes/no read-out spread: {sum(g > 0 for g in gap)}/{len(gap)} calibration questions lean yes")


def build(
    shape: str,
    out: Path,
    *,
    seed: int = 0,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    calibration_images: list[Path] = (),
) -> Path:
    """Build the random model of ``shape`` on ``device`` in ``dtype``, spread its yes/no rows, save it (tokenizer and
    image processor included) with its family's ``save_pretrained``."""
    fam = random_family(shape, seed=seed, device=device, dtype=dtype)
    spread_yes_no(fam, seed=seed, images=list(calibration_images))
    fam.save_pretrained(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--shape",
        choices=list(FAMILY),
        default="7b",
        help="7b / omni12b: the released LLaVA 1.5 7B / OmniLMM 12B sizes (GPU); tiny / omni-tiny: CPU smoke runs",
    )
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument(
        "--calibration-images",
        type=Path,
        nargs="*",
        default=[],
        help="images like the run's (e.g. 4 of its prompts'): the yes/no read-out is centred on them",
    )
    args = p.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if (args.out / "config.json").is_file():
        from muffin.family import detect_family

        found = detect_family(args.out)
        if found != family_of(args.shape):
            raise SystemExit(
                f"error: {args.out} holds a '{found}' checkpoint, not --shape {args.shape}'s "
                f"'{family_of(args.shape)}'; pass another --out or delete it"
            )
        print(f"{args.out} exists; kept")
        return
    print(
        build(
            args.shape,
            args.out,
            seed=args.seed,
            device=device,
            dtype=dtype,
            calibration_images=args.calibration_images,
        )
    )


if __name__ == "__main__":
    main()
