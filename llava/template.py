"""The original LLaVA ``llava_v1`` conversation template, rendered byte-exactly.

Original (llava/conversation.py, ``conv_vicuna_v1``, sep " ", sep2 "</s>"):
``"{system} USER: <image>\\n{question} ASSISTANT:"`` then the answer as ``" {answer}</s>"``.
"""

from __future__ import annotations

SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
IMAGE_PLACEHOLDER = "<image>"
EOS = "</s>"


def render_prompt(question: str, *, has_image: bool = True, system: str = SYSTEM) -> str:
    """The prompt up to and including ``ASSISTANT:`` (no trailing space: the answer brings its own)."""
    body = f"{IMAGE_PLACEHOLDER}\n{question}" if has_image else question
    return f"{system} USER: {body} ASSISTANT:"


def render_answer(answer: str) -> str:
    """The assistant turn as the original renders it after the prompt: a space, the answer, ``</s>``."""
    return f" {answer}{EOS}"


def render(question: str, answer: str | None = None, *, has_image: bool = True, system: str = SYSTEM) -> str:
    """Prompt, plus the answer turn when ``answer`` is given."""
    text = render_prompt(question, has_image=has_image, system=system)
    return text if answer is None else text + render_answer(answer)
