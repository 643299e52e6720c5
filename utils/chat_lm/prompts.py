"""Prompt templates for chat LMs: reading one from ``--prompt-file`` (else a default) and filling its slots.

Slots are replaced literally, never with ``str.format``, so the JSON braces of a judge prompt stay intact.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def load_prompt(path: str | Path | None, default: str) -> tuple[str, str]:
    """(prompt text, its source) from ``--prompt-file`` or the default; the source goes into results and manifests.

    Example:
        >>> load_prompt(None, "Rate: {answer}")
        ('Rate: {answer}', 'default')
    """
    if path is None:
        return default, "default"
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"--prompt-file '{p}' does not exist; pass a text file (the published prompts: "
            "`python -m utils.fetch <name>`) or leave the flag out to use our default prompt"
        )
    text = p.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"--prompt-file '{p}' is empty; pass a file with the prompt")
    return text, str(p.resolve())


def fill_template(template: str, values: Mapping[str, str], positional: Sequence[str] = (), *, where: str) -> str:
    """Fill a prompt template by named ``{name}`` slots or, failing that, by bare ``{}`` slots in order.

    The published MMHal prompt has four bare ``{}`` slots; the other published prompts and ours use names. A
    template with no slot at all is returned as it is when no positional slots are expected.

    Args:
        template: the prompt text.
        values: slot name -> text.
        positional: slot names in the order bare ``{}`` slots are filled.
        where: how to name the template in errors (e.g. the ``--prompt-file`` path).

    Example:
        >>> fill_template("Q: {question} A: {answer}", {"question": "Is it red?", "answer": "Yes."}, where="t")
        'Q: Is it red? A: Yes.'
    """
    named = [k for k in values if "{" + k + "}" in template]
    if named:
        out = template
        for k in named:
            out = out.replace("{" + k + "}", values[k])
        return out
    parts = template.split("{}")
    if len(parts) - 1 == len(positional):
        pieces = [parts[0]]
        for name, tail in zip(positional, parts[1:]):
            pieces += [values[name], tail]
        return "".join(pieces)
    if not positional and "{}" not in template:
        return template
    raise ValueError(
        f"prompt template {where} has neither named slots ({', '.join('{' + k + '}' for k in values)}) nor "
        f"{len(positional)} bare '{{}}' slots (found {len(parts) - 1}); fix the template or pass the right file."
    )
