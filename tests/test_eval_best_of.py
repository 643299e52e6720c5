"""eval.answer --best-of N: every benchmark answered with the best of N samples by the self-feedback reward."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eval.answer import main
from muffin.decoding import CANDIDATE_SAMPLING
from muffin.family import load_family
from muffin.feedback.stage import stable_seed
from muffin.reward import SelfReward, best_of_n
from utils.io import read_jsonl


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from utils.tiny_models import build_tiny

    root = tmp_path_factory.mktemp("bon")
    a = build_tiny("llava", root / "aligned", seed=1)
    b = build_tiny("llava", root / "base", seed=2)
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(root / f"{i}.png")
    qs = root / "q.jsonl"
    qs.write_text(
        "".join(json.dumps({"id": f"q{i}", "question": "Describe.", "image": f"{i}.png"}) + "\n" for i in range(2))
    )
    return root, a, b, qs


def _run(root: Path, a: Path, b: Path, qs: Path, out: Path, *extra: str) -> None:
    main(["--benchmark", "jsonl", "--questions", str(qs), "--image-root", str(root), "--model-path", str(a),
          "--out", str(out), "--max-new-tokens", "6", "--best-of", "3", "--reward-reference", str(b), *extra])  # fmt: skip


def test_best_of_answers_are_the_rewards_picks(setup, tmp_path) -> None:
    """Each answer is what ``best_of_n`` picks with the question's seed, and the record carries the candidates'
    rewards with the index of the highest mean."""
    root, a, b, qs = setup
    out = tmp_path / "answers.jsonl"
    _run(root, a, b, qs, out)
    recs = read_jsonl(out)
    fa, fb = load_family(a, device="cpu"), load_family(b, device="cpu")
    rm = SelfReward(fa, fb)
    dec = CANDIDATE_SAMPLING.replace(max_new_tokens=6)
    for rec in recs:
        means = rec["best_of"]["reward_means"]
        assert len(means) == 3 and rec["best_of"]["index"] == means.index(max(means))
        img = Image.open(root / f"{rec['id'][1]}.png").convert("RGB")
        want = best_of_n(fa, rm, img, "Describe.", 3, dec, seed=stable_seed("best-of", 0, rec["id"]))
        assert rec["answer"] == want.answer.strip()
        assert means == pytest.approx([r.mean for r in want.rewards], abs=1e-6)


def test_best_of_rerun_with_other_settings_is_refused(setup, tmp_path) -> None:
    root, a, b, qs = setup
    out = tmp_path / "answers.jsonl"
    _run(root, a, b, qs, out)
    with pytest.raises(Exception, match="best_of"):
        _run(root, a, b, qs, out, "--seed", "1")
    with pytest.raises(SystemExit, match="--reward-reference"):
        main(
            [
                "--benchmark",
                "jsonl",
                "--questions",
                str(qs),
                "--model-path",
                str(a),
                "--out",
                str(out),
                "--best-of",
                "2",
            ]
        )
