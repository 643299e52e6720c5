"""Read a ``script/gpu/run_issue33.sh`` work folder and print its numbers as Markdown tables.

    python script/gpu/summarize.py runs/gpu33 > summary.md

Rates come from the commands' own output, stamped on arrival (``stamp.py``): a stage's loop time runs from its
progress bar's first line to its last (the model load before it excluded); a training step is the time between two
consecutive logged steps (``--logging_steps 1``: each log reads the metrics from the device, so the GPU cannot run
ahead); the steady state drops the first ``WARMUP`` steps of a run (compiled layers) and the steps that wrote a
checkpoint; the reference stage runs from the training phase's start to the reference module's last line.
"""

from __future__ import annotations

import csv
import json
import re
import statistics
import sys
from pathlib import Path

WARMUP = 3  # steps dropped at the start of each run (our compiled layers; TRL: TRL_WARMUP)
TRL_WARMUP = 2
# what each SHAPE of run_issue33.sh is (script/gpu/make_checkpoint.py builds it with random weights)
SHAPES = {
    "7b": "LLaVA 1.5 7B (CLIP ViT-L/14-336 + Llama-2-7B body, 32064 vocabulary rows)",
    "tiny": "tiny LLaVA 1.5 (CPU smoke run)",
    "omni12b": "OmniLMM 12B (EVA02-enormous tower + resampler + Zephyr-7B Mistral body, 32009 vocabulary rows)",
    "omni-tiny": "tiny OmniLMM (CPU smoke run)",
}
BAR = re.compile(r"^(?P<desc>[\w ]+):\s+(?P<pct>\d+)%\|.*?\|\s*(?P<n>\d+)/(?P<total>\d+)")


def stamped(path: Path) -> list[tuple[float, str]]:
    """(arrival time, line) pairs of a stamped log; [] when absent."""
    if not path.is_file():
        return []
    out = []
    for raw in path.read_text(errors="replace").splitlines():
        t, _, line = raw.partition("\t")
        try:
            out.append((float(t), line))
        except ValueError:
            continue
    return out


def bar_loop(lines: list[tuple[float, str]], desc: str) -> tuple[float, int] | None:
    """Seconds from the first to the last line of the progress bar ``desc`` (its last run), and its item count."""
    hits = [(t, m) for t, line in lines if (m := BAR.match(line)) and m["desc"].strip() == desc]
    if not hits:
        return None
    starts = [i for i, (_, m) in enumerate(hits) if int(m["n"]) == 0]
    hits = hits[starts[-1] :] if starts else hits
    return hits[-1][0] - hits[0][0], int(hits[-1][1]["n"])


def steps(lines: list[tuple[float, str]]) -> list[float]:
    """Arrival times of the trainer's per-step log lines (the dicts with a 'loss' key)."""
    return [t for t, line in lines if "'loss'" in line and "train_runtime" not in line]


def steady(times: list[float], first_step: int, save_every: int) -> list[float]:
    """Step lengths after WARMUP steps, without the steps that follow a checkpoint write."""
    out = []
    for i in range(1, len(times)):
        step = first_step + 1 + i  # the step that ends at times[i] (times[0] ends step first_step + 1)
        if i <= WARMUP or (save_every and (step - 1) % save_every == 0):
            continue
        out.append(times[i] - times[i - 1])
    return out


def manifest(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def gpumem(path: Path) -> float | None:
    if not path.is_file():
        return None
    vals = [float(r[1]) for r in csv.reader(path.open()) if len(r) >= 2 and r[1].strip().isdigit()]
    return max(vals) / 1024 if vals else None


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def main() -> None:
    work = Path(sys.argv[1])
    logs = work / "logs"
    print(f"# issue 33 run: {work}\n")
    shape = str(_env(work, "SHAPE", "7b"))
    print(
        f"shape: {shape}, {SHAPES.get(shape, 'unknown shape')}, random weights; training script "
        f"{_env(work, 'TRAIN_SCRIPT', 'script/train/llava15_train_lora.sh')}\n"
    )
    rows = (
        list(csv.DictReader((logs / "phases.tsv").open(), delimiter="\t")) if (logs / "phases.tsv").is_file() else []
    )
    print("| phase | exit | seconds |\n| --- | --- | --- |")
    for r in rows:
        rc, log = r["rc"], _lines(logs / f"{r['phase']}.log")
        if rc == "skipped" and log and "skipped" in log[0]:  # run_issue33.sh writes the reason as the log's line
            rc = "skipped" + log[0].split("skipped", 1)[1]
        print(f"| {r['phase']} | {rc} | {r['seconds']} |")
    setup = [line for _, line in stamped(logs / "setup.log")]
    print(
        "\nversions: "
        + "; ".join(
            x
            for x in setup
            if re.match(
                r"^(python|torch|transformers|accelerate|peft|"
                r"deepspeed|trl|datasets|pyarrow|cuda) ",
                x,
            )
        )
    )
    gpu = [x for x in setup if "NVIDIA" in x and "MiB" in x]
    print(f"GPU: {gpu[0].strip() if gpu else 'n/a'}\n")

    print("| measure | value | how |\n| --- | --- | --- |")
    data = stamped(logs / "data.log")
    gen = bar_loop(data, "generate")
    if gen and gen[0] > 0 and gen[1]:
        print(
            f"| generate ({_env(work, 'NUM_SAMPLES', 10)} samples x 32 prompts, {_env(work, 'MAX_NEW_TOKENS', 512)} "
            f"new tokens max) | {gen[1] / gen[0]:.2f} answers/s "
            f"| {gen[1]} answers in {gen[0]:.1f} s of the stage's loop |"
        )
    chk = bar_loop(data, "autocheck")
    claims = manifest(work / "data" / "checked.jsonl.manifest.json").get("counts", {})
    n_claims = (
        sum(len(json.loads(x).get("claims") or []) for x in (work / "data" / "questions.jsonl").open())
        if (work / "data" / "questions.jsonl").is_file()
        else None
    )
    if chk and chk[0] > 0 and n_claims:
        print(
            f"| autocheck (policy as labeler) | {n_claims / chk[0]:.1f} claims/s | {n_claims} claims "
            f"({chk[1]} images) in {chk[0]:.1f} s of the stage's loop; counts {claims} |"
        )
    for f in sorted((work / "data").glob("*.manifest.json")):
        m = manifest(f)
        counts = {k: v for k, v in (m.get("counts") or {}).items() if isinstance(v, (int, float, str))}
        print(f"| {m.get('stage', f.name)} stage wall (load included) | {m.get('seconds')} s | counts {counts} |")

    batch = int(_env(work, "BATCH", 8))
    save = int(_env(work, "SAVE", 10))
    train = stamped(logs / "train.log")
    resume_at = next((t for t, line in train if line.startswith("RESUME:")), None)
    first = [t for t in steps(train) if resume_at is None or t < resume_at]
    second = [t for t in steps(train) if resume_at is not None and t > resume_at]
    start = next((float(r["start_epoch"]) for r in rows if r["phase"] == "train"), None)
    ref_end = next((t for t, line in train if "reference log-probs" in line and "wrote" in line), None)
    ref_loop = bar_loop(train, "reference logps")
    if start and ref_end:
        print(
            f"| reference stage (first run, load included) | {ref_end - start:.1f} s | phase start to "
            f"'wrote reference log-probs'; its loop {fmt(ref_loop and ref_loop[0], '.1f')} s |"
        )
    resumed = [line for _, line in train if "esum" in line and "checkpoint" in line]
    print(
        f"| kill and resume | {len(first)} steps logged before the kill, {len(second)} after | "
        f"{resumed[0][:160] if resumed else 'no resume line found'} |"
    )
    for name, times, first_step in (("run before the kill", first, 0), ("resumed run", second, save)):
        st = steady(times, first_step, save)
        if st:
            med = statistics.median(st)
            print(
                f"| training step, {name} (batch {batch}) | {batch / med:.2f} pairs/s | median of {len(st)} steps "
                f"{1000 * med:.0f} ms (min {1000 * min(st):.0f}, max {1000 * max(st):.0f}) |"
            )
    speed = stamped(logs / "speed.log")
    st = steady(steps(speed), 0, save)
    ours = None
    if st:
        ours = statistics.median(st)
        print(
            f"| training step, uninterrupted run (batch {batch}) | {batch / ours:.2f} pairs/s | median of {len(st)} "
            f"steps {1000 * ours:.0f} ms |"
        )
    elif second:
        st = steady(second, save, save)
        ours = statistics.median(st) if st else None
    for ph in ("train", "speed", "trl"):
        mem = gpumem(logs / f"gpumem_{ph}.csv")
        if mem is not None:
            print(f"| GPU memory in use, {ph} phase (nvidia-smi max) | {mem:.1f} GiB | every 0.5 s |")
    n_pairs = manifest(work / "lora" / "manifest.json").get("counts", {}).get("pairs")
    if ours and start and ref_end and n_pairs:
        epoch = (ref_end - start) + (n_pairs / batch) * ours
        print(
            f"| epoch incl. reference stage ({n_pairs} pairs) | {epoch:.1f} s = {n_pairs / epoch:.2f} pairs/s "
            f"| reference stage + {n_pairs}/{batch} steps x median step |"
        )

    trl = manifest(work / "trl_stats.json")
    ends = trl.get("step_end") or []
    st = [b - a for a, b in zip(ends[TRL_WARMUP:], ends[TRL_WARMUP + 1 :])]
    if trl and not st:
        print(f"| TRL DPOTrainer.train() | n/a | {len(ends)} steps timed; the median needs {TRL_WARMUP + 2} or more |")
    elif st and not trl.get("peak_tflops"):  # the CPU smoke run: no GPU memory, no matmul peak
        med = statistics.median(st)
        print(
            f"| TRL {trl.get('trl_version')} DPOTrainer.train() on the CPU | {trl['batch_size'] / med:.2f} pairs/s "
            f"| median of {len(st)} steps {1000 * med:.0f} ms |"
        )
    elif st:
        med = statistics.median(st)
        bs = trl["batch_size"]
        tok = statistics.mean(trl["lm_tokens"])
        prompt = statistics.mean(trl["prompt_tokens"])
        peak = trl["peak_tflops"]
        mfu_trl = 6 * trl["n_lm_params"] * tok / med / 1e12 / peak
        print(
            f"| TRL {trl.get('trl_version')} DPOTrainer.train() (batch {bs}) | {bs / med:.2f} pairs/s | median of "
            f"{len(st)} steps {1000 * med:.0f} ms; peak allocated {trl['max_memory_allocated_gib']:.1f} GiB, "
            f"reserved {trl['max_memory_reserved_gib']:.1f} GiB; MFU {100 * mfu_trl:.0f}% of {peak:.0f} TFLOP/s "
            f"(6 N tokens, {tok:.0f} LM tokens/step) |"
        )
        if ours:
            packed = tok - prompt / 2  # each pair's prompt once instead of twice
            mfu = 4 * trl["n_lm_params"] * packed / ours / 1e12 / peak
            print(f"| ours / TRL, pairs/s | {med / ours:.2f}x | same data, checkpoint, GPU and lease |")
            print(
                f"| ours, MFU of the training step | {100 * mfu:.0f}% | 4 N tokens, about {packed:.0f} LM tokens "
                f"per step (TRL's count less one prompt per pair) |"
            )


def _lines(path: Path) -> list[str]:
    return path.read_text(errors="replace").splitlines() if path.is_file() else []


def _env(work: Path, key: str, default: object) -> object:
    f = work / "logs" / "env.json"
    return json.loads(f.read_text()).get(key, default) if f.is_file() else default


if __name__ == "__main__":
    main()
