"""Reward-ranked feedback (muffin.feedback.reward_feedback) on the generate stage's output, tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from muffin.family import load_family
from muffin.feedback.reward_feedback import build_reward_pairs, main
from muffin.reward import PairRules, SelfReward
from utils.fingerprint import StaleOutputError
from utils.io import read_jsonl


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from muffin.feedback.generate import main as generate
    from muffin.world.build import main as build
    from utils.tiny_models import build_tiny

    root = tmp_path_factory.mktemp("rf")
    build(["--out", str(root / "world"), "--n-sft", "0", "--n-feedback", "3", "--n-val", "0", "--n-test", "0"])
    a = build_tiny("llava", root / "aligned", seed=1)
    b = build_tiny("llava", root / "base", seed=2)
    prompts = root / "world" / "feedback" / "prompts.jsonl"
    generate(["--prompts", str(prompts), "--image-root", str(root / "world"), "--policy", str(a), "--out",
              str(root / "answers.jsonl"), "--num-samples", "6", "--max-new-tokens", "12", "--device", "cpu"])  # fmt: skip
    return root, a, b, prompts


def _run(root: Path, a: Path, b: Path, prompts: Path, out: str, *extra: str) -> None:
    main(["--answers", str(root / "answers.jsonl"), "--prompts", str(prompts), "--image-root", str(root / "world"),
          "--reward-model", str(a), "--reward-reference", str(b), "--out", str(root / out),
          "--pairs-out", str(root / out.replace("rewarded", "pairs")), *extra])  # fmt: skip


def test_rewards_pairs_resume_and_refusal(work, monkeypatch) -> None:
    """Each answer's reward is SelfReward's on its prompt; the pairs are build_reward_pairs' (the engine's rules) in
    the pairs stage's format; a rerun reuses every record; another reference is refused."""
    root, a, b, prompts = work
    _run(root, a, b, prompts, "rewarded.jsonl", "--max-word-gap", "40")
    rewarded = read_jsonl(root / "rewarded.jsonl")
    answers = read_jsonl(root / "answers.jsonl")
    assert [r["answer_id"] for r in rewarded] == [r["answer_id"] for r in answers]
    first = [r for r in rewarded if r["prompt_id"] == rewarded[0]["prompt_id"]]
    rm = SelfReward(load_family(a, device="cpu"), load_family(b, device="cpu"))
    img = root / "world" / first[0]["image_path"]
    want = rm.score(img, first[0]["question"], [r["answer"] for r in first])
    assert [r["reward_mean"] for r in first] == pytest.approx([w.mean for w in want], abs=1e-6)
    assert all(r["score"] == r["reward_mean"] for r in rewarded)
    pairs = read_jsonl(root / "pairs.jsonl")
    expected, stats = build_reward_pairs(rewarded, PairRules(max_word_gap=40))
    assert pairs == expected and stats["pairs"] == len(pairs)
    for p in pairs:
        ch = next(r for r in rewarded if r["answer_id"] == p["chosen_id"])
        rj = next(r for r in rewarded if r["answer_id"] == p["rejected_id"])
        assert ch["reward_sum"] > rj["reward_sum"] and ch["reward_mean"] > rj["reward_mean"]
    manifest = json.loads((root / "rewarded.manifest.json").read_text())
    assert manifest["stage"] == "reward"
    scored = []
    monkeypatch.setattr(SelfReward, "score_groups", lambda self, groups, **kw: scored.append(groups) or [])
    _run(root, a, b, prompts, "rewarded.jsonl", "--max-word-gap", "40")
    assert scored == [] and read_jsonl(root / "rewarded.jsonl") == rewarded  # nothing scored again
    with pytest.raises(StaleOutputError, match="reward_reference"):
        _run(root, a, a, prompts, "rewarded.jsonl")


def test_pipeline_with_reward_feedback(work) -> None:
    """`pipeline --feedback reward`: generate, rewards, the engine's pairs, balance, export and the report, with no
    claims stage; the same pairs as the stage on its own would make from the pipeline's rewarded answers."""
    from muffin.feedback.pipeline import main as pipeline

    root, a, b, prompts = work
    wd = root / "pipe"
    pipeline(["--prompts", str(prompts), "--image-root", str(root / "world"), "--policy", str(a), "--work-dir",
              str(wd), "--num-samples", "6", "--max-new-tokens", "12", "--device", "cpu", "--feedback", "reward",
              "--reward-reference", str(b), "--reward-max-word-gap", "40"])  # fmt: skip
    assert not (wd / "claims.jsonl").exists() and (wd / "dataset.parquet").is_file()
    rewarded = read_jsonl(wd / "rewarded.jsonl")
    assert read_jsonl(wd / "pairs.jsonl") == build_reward_pairs(rewarded, PairRules(max_word_gap=40))[0]
    report = json.loads((wd / "report" / "report.json").read_text())
    assert (
        report["reward_mean"]["n"] == len([r for r in rewarded if not r.get("error")]) and report["claims_total"] == 0
    )
    with pytest.raises(ValueError, match="needs reward_model .* or reward_reference"):
        pipeline(["--prompts", str(prompts), "--policy", str(a), "--work-dir", str(wd), "--feedback", "reward"])
