"""Throughput of the self-feedback reward (``muffin.reward.SelfReward``) on one GPU; prints a table.

    python script/bench/bench_reward.py --shape 7b

Two random models of the shape (the aligned one and its reference), questions with N answers each (best-of-N and
the data engine's sample counts). Ours: ``SelfReward.score_groups``, each question's answers behind one shared
image + prompt encoding in each model. Baseline: every answer scored as its own padded sequence (image and prompt
encoded again per answer), as the released data engine does. The rewards are first checked against answers scored
one at a time on the plain path.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from muffin.family import Sample
from muffin.inference import answer_logps
from muffin.reward import SelfReward, token_rewards
from script.bench.common import build_model, print_table, random_image, timeit, words


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="7b", choices=["7b", "1.5b"])
    p.add_argument("--questions", type=int, default=8, help="questions (an image each) per timed run")
    p.add_argument("--answers", type=int, nargs="+", default=[10, 16], help="answers per question (N)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32], help="answers per forward pass (ours)")
    p.add_argument("--baseline-batch", type=int, default=8, help="answers per forward pass (baseline)")
    p.add_argument("--answer-words", type=int, nargs=2, default=[100, 250])
    p.add_argument("--check", type=int, default=6, help="answers checked one at a time against the plain path")
    return p


def make_groups(n_questions: int, n_answers: int, answer_words: tuple[int, int], seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    groups = []
    for _ in range(n_questions):
        img = random_image(rng)
        q = words(rng, 30) + "?"
        groups.append((img, q, [words(rng, int(rng.integers(*answer_words))) for _ in range(n_answers)]))
    return groups


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main() -> None:
    args = make_parser().parse_args()
    log(f"building two random {args.shape} models")
    aligned, reference = build_model(args.shape, seed=0), build_model(args.shape, seed=1)
    rows = []
    for n in args.answers:
        groups = make_groups(args.questions, n, tuple(args.answer_words), seed=n)
        samples = [Sample(img, q, a) for img, q, answers in groups for a in answers]
        n_ans = len(samples)
        # check: the first question's answers one at a time on the plain path
        rm = SelfReward(aligned, reference, batch_size=args.batch_sizes[0])
        log(f"N={n}: checking against single answers (the first call compiles the decoder layers)")
        fast = rm.score_groups(groups[:1])[0][: args.check]
        single = [Sample(groups[0][0], groups[0][1], a) for a in groups[0][2][: args.check]]
        plain = token_rewards(
            answer_logps(aligned, single, batch_size=1, packed=False),
            answer_logps(reference, single, batch_size=1, packed=False),
            rm.beta,
        )
        err_sum = max(abs(f.sum - p.sum) / max(1.0, abs(p.sum)) for f, p in zip(fast, plain))
        err_mean = max(abs(f.mean - p.mean) for f, p in zip(fast, plain))
        same_best = int(np.argmax([f.mean for f in fast])) == int(np.argmax([p.mean for p in plain]))
        tokens = sum(len(p.per_token) for p in plain) / len(plain)

        def baseline(samples=samples) -> None:
            answer_logps(aligned, samples, batch_size=args.baseline_batch, packed=False)
            answer_logps(reference, samples, batch_size=args.baseline_batch, packed=False)

        base = n_ans / timeit(baseline, warmup=1, repeat=2).median_s
        log(f"N={n}: baseline {base:.1f} answers/s")
        for b in args.batch_sizes:
            rm = SelfReward(aligned, reference, batch_size=b)
            ours = n_ans / timeit(lambda rm=rm, g=groups: rm.score_groups(g), warmup=1, repeat=2).median_s
            log(f"N={n}, {b} answers/batch: {ours:.1f} answers/s")
            rows.append(
                [
                    f"reward, N={n} answers/question, {b} answers/batch",
                    "answers/s",
                    f"{base:.1f}",
                    f"{ours:.1f}",
                    f"{ours / base:.1f}x",
                    f"{args.questions} questions x {n}; answers {tokens:.0f} tokens on average; vs plain single "
                    f"answers: max rel. diff of sums {err_sum:.1e}, max abs diff of per-token means {err_mean:.1e}, "
                    f"same best answer {same_best}",
                ]
            )
    print_table(
        f"Self-feedback reward, {args.shape} shape, {torch.cuda.get_device_name(0)}, bf16, two models",
        ["stage", "unit", f"baseline (padded, {args.baseline_batch}/batch)", "ours", "speed-up", "notes"],
        rows,
    )
    log(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
