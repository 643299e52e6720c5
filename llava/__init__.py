"""LLaVA 1.5 family: transformers' LlavaForConditionalGeneration, the llava_v1 template, pad preprocessing, and
loaders for the llava-hf, original (llava_llama) and original-LoRA checkpoint formats."""

from llava.family import LlavaFamily

__all__ = ["LlavaFamily"]
