"""Save a random-weight LLaVA 1.5 checkpoint directory (llava-hf layout, ``save_pretrained``) for the full-size run.

    python -m script.gpu.make_checkpoint --shape 7b --out runs/gpu/llava7b-random      # on a GPU (bf16, ~14 GB)
    python -m script.gpu.make_checkpoint --shape tiny --out /tmp/llava-tiny-random      # CPU smoke run, seconds

The 7B shape is ``script.bench.common``'s (CLIP ViT-L/14-336, Llama-2-7B body, 32064 vocabulary rows). The tokenizer
is a small offline BPE whose ids are a subset of those rows; the saved generation config suppresses the rows it has
no token for, so sampled answers decode to text (about one token in 600 is ``</s>``: answers of a few hundred
tokens, as real ones) while every forward pass still computes all 32064 logits. A random model reads out nearly the
same yes/no probabilities for every question (its last position is the same "ASSISTANT:" token), which leaves every
answer of a prompt with one score and the pipeline with no pairs; ``spread_yes_no`` moves the yes and no rows of the
output layer apart along a direction orthogonal to that common state, so the verdicts follow the question.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration

from llava.family import LlavaFamily
from llava.preprocess import make_image_processor
from llava.tiny import tiny_llava_tokenizer
from muffin.family import Sample
from muffin.inference import yes_no_probs, yes_no_token_ids
from script.bench.common import CLIP_L336, SHAPES, WORDS, llava15_config

VISION = {
    "7b": CLIP_L336,
    "tiny": dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2),
}
TEXT = {
    "7b": SHAPES["7b"],
    "tiny": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4),
}


@torch.no_grad()
def spread_yes_no(
    fam: LlavaFamily, *, seed: int = 0, images: int = 4, per_image: int = 16, logit_std: float = 2.0
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
    """Build the random model of ``shape`` on ``device`` in ``dtype`` and save it with its tokenizer and processor."""
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) + "." for i in range(len(WORDS))] * 5
    tok = tiny_llava_tokenizer(corpus=corpus, vocab_size=600)
    cfg = llava15_config(tok, TEXT[shape], VISION[shape])
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(seed)
        with torch.device(device):
            model = LlavaForConditionalGeneration(cfg).eval()
    finally:
        torch.set_default_dtype(prev)
    # rows past the tokenizer's vocabulary decode to nothing: never sample them (the logits are still computed)
    model.generation_config.suppress_tokens = list(range(len(tok), cfg.text_config.vocab_size))
    model.generation_config.pad_token_id = tok.pad_token_id
    fam = LlavaFamily(model, tok, make_image_processor(336))
    spread_yes_no(fam, seed=seed, images=list(calibration_images))
    fam.save_pretrained(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(TEXT), default="7b")
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
