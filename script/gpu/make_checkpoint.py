"""Save a random-weight LLaVA 1.5 checkpoint directory (llava-hf layout, ``save_pretrained``) for the full-size run.

    python -m script.gpu.make_checkpoint --shape 7b --out runs/gpu/llava7b-random      # on a GPU (bf16, ~14 GB)
    python -m script.gpu.make_checkpoint --shape tiny --out /tmp/llava-tiny-random      # CPU smoke run, seconds

The 7B shape is ``script.bench.common``'s (CLIP ViT-L/14-336, Llama-2-7B body, 32064 vocabulary rows). The tokenizer
is a small offline BPE whose ids are a subset of those rows; the saved generation config suppresses the rows it has
no token for, so sampled answers decode to text (about one token in 600 is ``</s>``: answers of a few hundred
tokens, as real ones) while every forward pass still computes all 32064 logits.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from llava.family import LlavaFamily
from llava.preprocess import make_image_processor
from llava.tiny import tiny_llava_tokenizer
from script.bench.common import SHAPES, WORDS

VISION = {
    "7b": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
    "tiny": dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2),
}
TEXT = {
    "7b": SHAPES["7b"],
    "tiny": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4),
}


def build(shape: str, out: Path, *, seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Path:
    """Build the random model of ``shape`` on ``device`` in ``dtype`` and save it with its tokenizer and processor."""
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) + "." for i in range(len(WORDS))] * 5
    tok = tiny_llava_tokenizer(corpus=corpus, vocab_size=600)
    vision = CLIPVisionConfig(
        image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu", **VISION[shape]
    )
    text = LlamaConfig(
        vocab_size=32064,
        max_position_embeddings=4096,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        **TEXT[shape],
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        pad_token_id=tok.pad_token_id,
    )
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(seed)
        with torch.device(device):
            model = LlavaForConditionalGeneration(cfg).eval()
    finally:
        torch.set_default_dtype(prev)
    # rows past the tokenizer's vocabulary decode to nothing: never sample them (the logits are still computed)
    model.generation_config.suppress_tokens = list(range(len(tok), text.vocab_size))
    model.generation_config.pad_token_id = tok.pad_token_id
    LlavaFamily(model, tok, make_image_processor(336)).save_pretrained(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(TEXT), default="7b")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    args = p.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if (args.out / "config.json").is_file():
        print(f"{args.out} exists; kept")
        return
    print(build(args.shape, args.out, seed=args.seed, device=device, dtype=dtype))


if __name__ == "__main__":
    main()
