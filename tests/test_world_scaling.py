"""Best-of-N in the synthetic world (muffin.world.scaling): the selectors, and the CLI end to end on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from muffin.reward import Reward
from muffin.world.scaling import best_of_n_table, oracle_index


def _d(prompt: str, hallucinated: int, correct: int, mentions: int) -> dict:
    return {
        "prompt_id": prompt,
        "hallucinated": [["x", "x"]] * hallucinated,
        "correct_objects": ["c"] * correct,
        "mentions": [["m", "m"]] * mentions,
        "gt_objects": ["c", "d"],
        "chair_s": int(hallucinated > 0),
        "n_words": 5,
    }


def test_oracle_prefers_fewer_hallucinations_then_more_recall() -> None:
    assert oracle_index([_d("p", 1, 2, 3), _d("p", 0, 1, 1), _d("p", 0, 2, 2), _d("p", 0, 2, 2)]) == 2


def test_best_of_n_table_by_hand() -> None:
    """Two prompts, two candidates each. Prompt a: cand 0 hallucinates 1 of 2 mentions (reward mean 0.5), cand 1 none
    of 1 (mean 0.1). Prompt b: cand 0 clean, 2 mentions (mean 0.0), cand 1 hallucinates 2 of 2 (mean 0.3).
    N=1: both selectors take cand 0: mentions 2 + 2, hallucinated 1 -> CHAIR-i 1/4, response 1/2.
    N=2, reward: a0 (mean 0.5 > 0.1) and b1 (0.3 > 0.0): hallucinated 1 + 2 of 2 + 2 mentions -> 3/4.
    N=2, oracle: a1 and b0: 0 of 1 + 2 -> 0, recall (1 + 2) / (2 + 2)."""
    details = [_d("a", 1, 1, 2), _d("a", 0, 1, 1), _d("b", 0, 2, 2), _d("b", 2, 0, 2)]
    rewards = [Reward(1.0, 0.5, []), Reward(1.0, 0.1, []), Reward(0.0, 0.0, []), Reward(0.6, 0.3, [])]
    t = best_of_n_table(details, rewards, [1, 2])
    assert t["reward"][1]["chair_i"] == t["oracle"][1]["chair_i"] == pytest.approx(0.25)
    assert t["reward"][1]["response_hallucination"] == pytest.approx(0.5)
    assert t["reward"][2]["chair_i"] == pytest.approx(0.75)
    assert t["oracle"][2]["chair_i"] == 0.0 and t["oracle"][2]["recall"] == pytest.approx(3 / 4)


def test_scaling_cli_on_tiny_models(tmp_path: Path) -> None:
    """Four scenes, two random policies: the outputs exist, N=1 is the same pick for both selectors, and the oracle's
    count of hallucinated mentions never rises with N (each prompt's pick can only get cleaner among more)."""
    from muffin.world.build import main as build_main
    from muffin.world.scaling import main
    from utils.tiny_models import build_tiny

    world = tmp_path / "world"
    build_main(["--out", str(world), "--n-sft", "0", "--n-feedback", "0", "--n-val", "0", "--n-test", "4"])
    a = build_tiny("llava", tmp_path / "a", seed=1)
    b = build_tiny("llava", tmp_path / "b", seed=2)
    out = tmp_path / "out"
    main(
        ["--world", str(world), "--policy", f"aligned={a}", "--policy", f"base={b}", "--reward-model", str(a),
         "--reward-reference", str(b), "--n", "1", "2", "4", "--seeds", "0", "--max-new-tokens", "6",
         "--device", "cpu", "--out", str(out)]
    )  # fmt: skip
    res = json.loads((out / "scaling.json").read_text())
    assert (out / "scaling.png").stat().st_size > 0 and "| aligned | reward | 4 |" in (out / "scaling.md").read_text()
    for name in ("aligned", "base"):
        run = res["runs"][f"{name}/seed0"]
        assert run["reward"]["1"] == run["oracle"]["1"]
        oracle = [run["oracle"][n]["n_hallucinated_mentions"] for n in ("1", "2", "4")]
        assert oracle[0] >= oracle[1] >= oracle[2]
