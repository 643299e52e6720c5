"""MiniCPM-Llama3-V 2.5 family's opt-in remote-code path, on a tiny LOCAL remote-code model with the real code's
public interface (the native path is tested in test_minicpmv_native.py).

The real checkpoint's code cannot be downloaded here; these tests cover the opt-in loader, our batching (left
padding with shifted image bounds), the yes/no read-out (checked against the remote code's own ``generate``
scores) and seeded candidate sampling.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from muffin.decoding import CANDIDATE_SAMPLING, GREEDY
from muffin.family import Sample, detect_family, load_family
from muffin.inference import generate, yes_no_probs, yes_no_token_ids


@pytest.fixture(scope="module")
def tiny_minicpmv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from utils.tiny_models import build_tiny

    return build_tiny("minicpmv_remote", tmp_path_factory.mktemp("tiny-minicpmv"))


@pytest.fixture(scope="module")
def fam(tiny_minicpmv: Path):
    return load_family(tiny_minicpmv, device="cpu", dtype=torch.float32, trust_remote_code=True)


QUESTIONS = [
    Sample(Image.new("RGB", (40, 30), (200, 10, 10)), "Is there a dog in the image?"),
    Sample(None, "Is it red? Answer yes or no."),
    Sample(Image.new("RGB", (20, 50), (10, 200, 10)), "Is there a red circle?"),
]


def test_remote_code_only_when_asked(tiny_minicpmv: Path) -> None:
    """Without the opt-in the native loader reads config.json, finds no vision_config and names the flag."""
    assert detect_family(tiny_minicpmv) == "minicpmv"
    with pytest.raises(ValueError, match="vision_config.*trust_remote_code=True"):
        load_family(tiny_minicpmv, device="cpu")
    with pytest.raises(ValueError, match="revision.*trust_remote_code=True"):
        load_family(tiny_minicpmv, device="cpu", revision="0123abc")


def test_loads_remote_classes_and_passes_revision(tiny_minicpmv: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every remote load gets trust_remote_code=True and the pinned revision (spied on the Auto classes)."""
    import transformers

    seen: list[tuple[str, dict]] = []
    for auto in ("AutoModel", "AutoTokenizer", "AutoProcessor"):
        cls = getattr(transformers, auto)
        orig = cls.from_pretrained.__func__

        def spy(klass, path, *a, _orig=orig, _name=auto, **kw):  # noqa: ANN001, ANN202
            seen.append((_name, dict(kw)))
            kw["revision"] = None  # a local directory has no git revisions
            return _orig(klass, path, *a, **kw)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    f = load_family(tiny_minicpmv, device="cpu", trust_remote_code=True, revision="0123abc")
    # (the processor loads its own tokenizer too, with the revision the spy rewrote: count our three calls)
    pinned = {n for n, kw in seen if kw.get("revision") == "0123abc" and kw.get("trust_remote_code") is True}
    assert pinned == {"AutoModel", "AutoProcessor", "AutoTokenizer"}
    assert type(f.model).__module__.startswith("transformers_modules")  # the checkpoint's own code
    assert f.revision == "0123abc"


def test_left_padded_batch_keeps_image_bounds_on_image_slots(fam) -> None:
    batch = fam.encode(QUESTIONS, for_generation=True)
    unk = fam.tokenizer.unk_token_id
    lengths = batch["attention_mask"].sum(-1)
    assert int(lengths.min()) < batch["input_ids"].shape[1]  # really padded
    for b, bounds in enumerate(batch["image_bound"]):
        assert len(bounds) == (0 if QUESTIONS[b].image is None else 1)
        for s, e in bounds.tolist():
            assert e - s == 4 and bool((batch["input_ids"][b, s:e] == unk).all())
        assert bool(batch["attention_mask"][b, -1])  # left padding: every prompt ends at the last column
    text = fam.tokenizer.decode(batch["input_ids"][1][batch["attention_mask"][1].bool()])
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_yes_no_matches_remote_generate_scores(fam) -> None:
    """Our read-out (forward on a left-padded batch, last position) equals the first-step scores of the remote
    code's own generate() run one sample at a time, for P(yes)+P(Yes) and P(no)+P(No)."""
    yes, no = yes_no_token_ids(fam)
    assert yes and no and not set(yes) & set(no)
    ours = yes_no_probs(fam, QUESTIONS, batch_size=3)
    for q, (p_yes, p_no) in zip(QUESTIONS, ours):
        inputs = fam.processor(fam._prompt(0, q), [q.image] if q.image else None, return_tensors="pt")
        out = fam.model.generate(
            inputs,
            tokenizer=fam.tokenizer,
            max_new_tokens=1,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
        probs = out.scores[0][0].float().softmax(-1)
        assert p_yes == pytest.approx(float(probs[yes].sum()), rel=1e-4)
        assert p_no == pytest.approx(float(probs[no].sum()), rel=1e-4)


def test_answer_mask_is_answer_plus_eot(fam) -> None:
    batch = fam.encode([Sample(QUESTIONS[0].image, "What is it?", "A red box.")])
    mask = batch["answer_mask"][0]
    assert fam.tokenizer.decode(batch["input_ids"][0][mask]) == "A red box.<|eot_id|>"


def test_greedy_is_batch_independent(fam) -> None:
    dec = GREEDY.replace(max_new_tokens=4)
    assert generate(fam, QUESTIONS, dec, batch_size=3) == [generate(fam, [q], dec)[0] for q in QUESTIONS]


def test_candidate_sampling_ten_per_prompt(fam) -> None:
    """The sampler preset is the paper's (T 0.7, 512 tokens); 10 seeded samples are repeatable per seed."""
    assert fam.sampler_decoding == CANDIDATE_SAMPLING
    dec = CANDIDATE_SAMPLING.replace(max_new_tokens=4)
    prompts, seeds = [QUESTIONS[0]] * 10, list(range(100, 110))
    batched = generate(fam, prompts, dec, seeds=seeds, batch_size=10)
    assert len(batched) == 10 and len(set(batched)) > 1
    assert batched[3] == generate(fam, [QUESTIONS[0]], dec, seeds=[103])[0]
