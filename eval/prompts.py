"""The project's default judge prompts and the published RefoMB message layout (prompt files are read and filled by
``utils.chat_lm.prompts``).

Our defaults keep the output contracts of the published protocols (a JSON list of objects, ``Rating: k`` with
k in 0..6, a final ``[[A]]``/``[[B]]``/``[[C]]``) so that the same parsers read both. Numbers meant to be compared
with published ones use the published texts (``python -m utils.fetch prompt-objhal-extraction``,
``prompt-mmhal-judge``, ``prompt-refomb-pairwise``, ``prompt-refomb-hallucination``) passed as ``--prompt-file``.
"""

from __future__ import annotations

OBJHAL_EXTRACTION = """You read an answer that a vision assistant gave about a photograph, and you list the \
physical objects the answer says are visible in it.

Question asked about the photograph:
{question}

Assistant's answer:
{answer}

Rules:
- List only objects the answer itself states are present; treat the answer as true.
- Give bare object names ("dog", "traffic light"), without colours, materials, counts or other attributes.
- Leave out things the answer says are absent, places and scenes ("beach", "kitchen"), and abstract notions.
- Reply with a JSON list of strings and nothing else, e.g. ["person", "bicycle"]; reply [] if there are none."""

MMHAL_JUDGE = """You grade a vision assistant's answer to a question about an image that you cannot see. You \
have a list of objects known to be in the image, the question, and a correct answer written by a person. Judge \
two things: how informative the assistant's answer is, and whether it hallucinates, that is, states anything \
about the image that the known contents and the correct answer contradict or give no ground for (objects, \
counts, attributes, actions, positions, text in the image).

The correct answer may be short and need not list every detail: extra detail or general reasoning that is \
plausible and contradicts nothing is not a hallucination, and neither is an answer that admits uncertainty or \
says it cannot tell. A wrong count, a wrong colour, or an object that is not there is.

Known image contents: {image_contents}

Question: {question}

Correct answer (written by a person): {standard_answer}

Assistant's answer to grade: {response}

Explain your judgement in a few sentences, then end with one line "Rating: k", where k is:
6 = very informative, with good analysis or reasoning, no hallucination
5 = very informative, no hallucination
4 = somewhat informative, no hallucination
3 = not informative, no hallucination
2 = very informative, with hallucination
1 = somewhat informative, with hallucination
0 = not informative, with hallucination"""

REFOMB_PAIRWISE_SYSTEM = """You compare two assistants' answers to a user's question about an image. You cannot \
see the image; instead you get a detailed description of it, which you must treat as complete and correct: \
anything an answer states about the image that the description contradicts or does not contain is a \
hallucination (wrong objects, counts, colours, text, positions, people's attributes or actions, the kind of \
image, its setting or mood). Creative tasks such as writing a story may invent freely beyond the image, but \
must not misstate what the image shows.

First compare the two answers for hallucinations, counting them for each. Then compare how helpful they are: \
relevant, correct, complete, clear. Finally weigh both, with hallucinations counting most, and end your reply \
with exactly one verdict: [[A]] if Assistant A's answer is better, [[B]] if Assistant B's answer is better, \
[[C]] if they are equally good."""

REFOMB_HALLUCINATION_SYSTEM = """You read a review that compared two assistants' answers (A and B) about an \
image, judging hallucinations and helpfulness. Ignore helpfulness: decide only which answer the review found to \
contain fewer hallucinations. Briefly state how many hallucinations the review found in each answer, then end \
with exactly one verdict: [[A]] if answer A has fewer hallucinations, [[B]] if answer B has fewer, [[C]] if \
they have the same number (including none for both)."""


def refomb_pairwise_user(description: str, question: str, answer_a: str, answer_b: str) -> str:
    """The user message of a RefoMB pairwise comparison (the same layout for our and the published system text)."""
    return (
        "[Beginning of the detailed description of the picture]\n"
        f"{description}\n"
        "[End of the detailed description of the picture]\n\n"
        "[Beginning of the user's question]\n"
        f"{question}\n"
        "[End of the user's question]\n\n"
        "[Beginning of Model A's answer]\n"
        f"{answer_a}\n"
        "[End of Model A's answer]\n\n"
        "[Beginning of Model B's answer]\n"
        f"{answer_b}\n"
        "[End of Model B's answer]"
    )


def refomb_hallucination_user(review: str) -> str:
    """The user message of the RefoMB hallucination pass: one pairwise review."""
    return f"[Beginning of the review text]\n{review}\n[End of the review text]"


# The published RefoMB scripts send these generic system messages and put their instructions in the user message.
REFOMB_PAPER_PAIRWISE_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
REFOMB_PAPER_HALLUCINATION_SYSTEM = "You are a helpful and precise assistant."


def refomb_pairwise_query_paper(
    instructions: str, description: str, question: str, answer_a: str, answer_b: str
) -> str:
    """The user message of the published pairwise pass (``construct_gpt4_query`` of ``eval_RefoMB_p0.py``): the
    instructions, then the four blocks, each line indented by four spaces as its f-string writes them."""
    return (
        f"\n    {instructions}\n\n"
        f"    [Beginning of the detailed description of the picture]\n    {description}\n"
        f"    [End of the detailed description of the picture]\n\n"
        f"    [Beginning of the user's question]\n    {question}\n    [End of the user's question]\n\n"
        f"    [Beginning of Model A's answer]\n    {answer_a}\n    [End of Model A's answer]\n\n"
        f"    [Beginning of Model B's answer]\n    {answer_b}\n    [End of Model B's answer]\n    "
    )


def refomb_hallucination_query_paper(instructions: str, review: str) -> str:
    """The user message of the published hallucination pass (``construct_gpt4_query`` of
    ``eval_hallucination.py``)."""
    return f"\n    {instructions}\n\n    [Beginning of the review text]\n    {review}\n    [End of the review text]\n\n    "
