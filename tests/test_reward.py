"""The self-feedback reward (muffin.reward): the per-token log-ratio, best-of-N and the reward-ranked pair rules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from muffin.decoding import CANDIDATE_SAMPLING
from muffin.family import Sample, load_family
from muffin.inference import AnswerLogps, answer_logps, generate
from muffin.reward import (
    PairRules,
    Reward,
    SelfReward,
    best_index,
    best_of_n,
    check_tokenizers,
    drop_near_duplicates,
    reward_pairs,
    token_rewards,
    word_count,
)


def test_token_rewards_by_hand() -> None:
    """aligned [-1, -2], reference [-1.5, -1], beta 0.1: per token 0.1 * (0.5, -1) = (0.05, -0.1), sum -0.05, mean
    -0.025 (the engine's second 0.1 on the mean is not applied)."""
    (r,) = token_rewards([AnswerLogps(-3, -1.5, [-1.0, -2.0])], [AnswerLogps(-2.5, -1.25, [-1.5, -1.0])], beta=0.1)
    assert r.per_token == pytest.approx([0.05, -0.1])
    assert r.sum == pytest.approx(-0.05) and r.mean == pytest.approx(-0.025)


def test_token_rewards_refuse_different_token_counts() -> None:
    with pytest.raises(ValueError, match="answer 0: the aligned model reads 2 tokens, the reference 3"):
        token_rewards([AnswerLogps(0, 0, [0.0, 0.0])], [AnswerLogps(0, 0, [0.0, 0.0, 0.0])])


def _r(s: float, m: float) -> Reward:
    return Reward(s, m, [])


def test_best_index() -> None:
    rewards = [_r(1.0, 0.1), _r(3.0, 0.05), _r(2.0, 0.2)]
    assert best_index(rewards) == 2 and best_index(rewards, "sum") == 1
    with pytest.raises(ValueError, match="unknown ranking 'max'"):
        best_index(rewards, "max")


def test_word_count_and_near_duplicates() -> None:
    assert word_count("A red ring, and two stars.") == 8  # A red ring , and two stars .
    base = "one two three four five six seven eight nine ten eleven"  # 11 words: two 10-grams
    # identical long text: Jaccard 1 > 0.9, dropped; one word changed at the end: 1 shared 10-gram of 3, kept;
    # short identical texts have no 10-grams and are kept (the engine's behaviour)
    texts = [base, base, base.replace("eleven", "twelve"), "a b", "a b"]
    assert drop_near_duplicates(texts) == [0, 2, 3, 4]


def test_reward_pairs_by_hand() -> None:
    """Six answers; sums rank 0 > 1 > 2 > 3 > 4 > 5, means rank 1 > 0 > 3 > 2 > 5 > 4.
    Top 3 by sum {0,1,2}, by mean {1,0,3}: chosen {0,1}. Bottom 3 by sum {3,4,5}, by mean {2,5,4}: rejected {4,5}.
    Word counts 10, 10, 10, 10, 40, 12: answer 4 is 30 words from every chosen (>= 25), so the pairs are
    (0,5) and (1,5)."""
    answers = [" ".join(["w"] * n) for n in (10, 10, 10, 10, 40, 12)]
    rewards = [_r(6, 0.5), _r(5, 0.6), _r(4, 0.2), _r(3, 0.3), _r(2, 0.0), _r(1, 0.1)]
    pairs = reward_pairs([a + f" x{i}" for i, a in enumerate(answers)], rewards, PairRules(ngram=50))
    assert sorted(pairs) == [(0, 5), (1, 5)]
    # a word gap of 40 admits answer 4 too; max_pairs caps the (seed-shuffled) list
    wide = reward_pairs(answers, rewards, PairRules(max_word_gap=40, ngram=50))
    assert sorted(wide) == [(0, 4), (0, 5), (1, 4), (1, 5)]
    assert len(reward_pairs(answers, rewards, PairRules(max_word_gap=40, max_pairs=3, ngram=50))) == 3


def test_reward_pairs_never_pair_an_answer_with_itself() -> None:
    """With three answers the top 3 and bottom 3 are the same set: only strictly better -> worse pairs remain."""
    answers = ["a", "b", "c"]
    rewards = [_r(3, 0.3), _r(2, 0.2), _r(1, 0.1)]
    assert sorted(reward_pairs(answers, rewards)) == [(0, 1), (0, 2), (1, 2)]


@pytest.fixture(scope="module")
def two_llavas(tmp_path_factory) -> tuple[Path, Path]:
    from utils.tiny_models import build_tiny

    a = build_tiny("llava", tmp_path_factory.mktemp("aligned"), seed=1)
    b = build_tiny("llava", tmp_path_factory.mktemp("reference"), seed=2)
    return a, b


@pytest.fixture(scope="module")
def scene() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 30, 3), dtype=np.uint8))


def test_self_reward_equals_the_plain_log_ratio(two_llavas, scene) -> None:
    """The packed reward of three answers equals 0.1 * (log pi_a - log pi_b) computed answer by answer on the plain
    path (no shared prefix); a model against itself gives exactly zero."""
    a, b = two_llavas
    fa, fb = load_family(a, device="cpu"), load_family(b, device="cpu")
    rm = SelfReward(fa, fb)
    answers = ["A red circle.", "Two blue squares and a cat.", "Nothing."]
    got = rm.score(scene, "Describe the image.", answers)
    for ans, r in zip(answers, got):
        [la] = answer_logps(fa, [Sample(scene, "Describe the image.", ans)], packed=False)
        [lb] = answer_logps(fb, [Sample(scene, "Describe the image.", ans)], packed=False)
        assert r.per_token == pytest.approx([0.1 * (x - y) for x, y in zip(la.per_token, lb.per_token)], abs=1e-5)
        assert r.sum == pytest.approx(0.1 * (la.sum - lb.sum), abs=1e-5)
        assert r.mean == pytest.approx(r.sum / len(la.per_token), abs=1e-6)
    zero = SelfReward(fa, fa).score(scene, "Describe the image.", answers)
    assert all(t == 0.0 for r in zero for t in r.per_token)


def test_reward_refuses_different_tokenizers(tmp_path, two_llavas) -> None:
    from utils.tiny_models import build_tiny

    qwen = load_family(build_tiny("qwen2_5_vl", tmp_path / "qwen"), device="cpu")
    with pytest.raises(ValueError, match="different tokenizers"):
        check_tokenizers(load_family(two_llavas[0], device="cpu"), qwen)


def test_best_of_n_samples_once_and_picks_the_best(two_llavas, scene) -> None:
    """The N candidates of one batched call equal N separate seeded samples (seed, seed+1, ...), and the answer is the
    candidate with the highest per-token reward."""
    a, b = two_llavas
    fa, fb = load_family(a, device="cpu"), load_family(b, device="cpu")
    rm = SelfReward(fa, fb)
    dec = CANDIDATE_SAMPLING.replace(max_new_tokens=8)
    res = best_of_n(fa, rm, scene, "Describe the image.", 4, dec, seed=10)
    alone = [generate(fa, [Sample(scene, "Describe the image.")], dec, seeds=[10 + i])[0] for i in range(4)]
    assert res.candidates == alone
    assert res.index == max(range(4), key=lambda i: res.rewards[i].mean) and res.answer == res.candidates[res.index]
    again = best_of_n(fa, rm, scene, "Describe the image.", 4, dec, seed=10)
    assert again.answer == res.answer
    with pytest.raises(ValueError, match="needs a sampling decoding"):
        best_of_n(fa, rm, scene, "q", 2, dec.replace(do_sample=False))


def test_chat_best_of(two_llavas, scene) -> None:
    from chat import RLAIFVChat

    a, b = two_llavas
    with pytest.raises(ValueError, match="best_of > 1 needs reward_reference"):
        RLAIFVChat(a, device="cpu", best_of=2)
    bot = RLAIFVChat(a, device="cpu", best_of=3, reward_reference=b, seed=5)
    bot.best_of_decoding = bot.best_of_decoding.replace(max_new_tokens=6)
    assert bot.reward.aligned is bot.family  # the chat model is the reward's aligned model: loaded once
    want = best_of_n(bot.family, bot.reward, scene, "Hi?", 3, bot.best_of_decoding, seed=5).answer
    assert bot.chat({"image": scene, "question": "Hi?"}) == want
    torch.manual_seed(0)


def test_reward_cli_prints_each_answers_reward(two_llavas, scene, tmp_path, capsys) -> None:
    import json

    from muffin.reward import main

    a, b = two_llavas
    path = tmp_path / "scene.png"
    scene.save(path)
    main(["--reward-model", str(a), "--reward-reference", str(b), "--image", str(path), "--question", "Describe.",
          "--answer", "A red circle.", "--answer", "Nothing.", "--device", "cpu"])  # fmt: skip
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    want = SelfReward(load_family(a, device="cpu"), load_family(b, device="cpu")).score(
        scene, "Describe.", ["A red circle.", "Nothing."]
    )
    assert [x["reward_mean"] for x in lines] == pytest.approx([w.mean for w in want], abs=1e-6)
    assert [x["best"] for x in lines] == [w.mean == max(v.mean for v in want) for w in want]


def test_reward_for_keeps_the_policys_lora(two_llavas, scene, tmp_path) -> None:
    """With a LoRA merged and no reward model named, the reward's aligned model is the policy as it answers (the
    adapter merged), not the base checkpoint: its reward against the base is non-zero and equals the log-ratio of
    the merged model to the base; naming the base path as the reward model gives the base (reward zero)."""
    from peft import LoraConfig, get_peft_model

    from muffin.reward import reward_for

    base = two_llavas[0]
    fam = load_family(base, device="cpu")
    peft_model = get_peft_model(fam.model, LoraConfig(r=4, lora_alpha=8, target_modules=fam.lora_target_modules()))
    torch.manual_seed(0)
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.5)
    peft_model.save_pretrained(tmp_path / "lora")
    policy = load_family(base, device="cpu", lora_path=tmp_path / "lora")
    answers = ["A red circle.", "Two blue squares."]
    for loaded in (policy, None):  # the loaded policy, or loaded here from its path + LoRA
        rm = reward_for(loaded, base, None, base, policy_lora=tmp_path / "lora", device="cpu")
        got = rm.score(scene, "Describe the image.", answers)
        for ans, r in zip(answers, got):
            [la] = answer_logps(policy, [Sample(scene, "Describe the image.", ans)], packed=False)
            [lb] = answer_logps(rm.reference, [Sample(scene, "Describe the image.", ans)], packed=False)
            assert abs(la.sum - lb.sum) > 1e-3  # the adapter changes the answer's log-prob
            assert r.sum == pytest.approx(0.1 * (la.sum - lb.sum), abs=1e-4)
    named_base = reward_for(policy, base, base, base, policy_lora=tmp_path / "lora", device="cpu")
    assert named_base.aligned is not policy
    assert all(t == 0.0 for r in named_base.score(scene, "Describe the image.", answers) for t in r.per_token)
