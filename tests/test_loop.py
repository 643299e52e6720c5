"""The iterative loop: a reduced end-to-end run (1 iteration, a handful of prompts) on the synthetic world, the
artefacts of every stage, resuming, checkpoint selection and config validation."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from muffin.loop import STAGES, Loop, LoopConfig, StageState, base_metrics, select_checkpoint

REPO = Path(__file__).resolve().parents[1]


def run_script(script: str, *args: str, env: dict[str, str] | None = None, timeout: int = 600) -> str:
    """Run one of the repo's bash scripts (path relative to the repo root) from the repo root; it must exit 0.
    Returns its stdout."""
    import os
    import subprocess
    import sys

    env = dict(os.environ if env is None else env)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `python` is this interpreter
    res = subprocess.run(
        ["bash", str(REPO / script), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


TINY_BOOTSTRAP = {
    "vision_hidden": 32,
    "text_hidden": 64,
    "text_layers": 2,
    "batch_size": 16,
    "vision_steps": 60,
    "steps": 120,
    "lr": 1e-3,
}


def test_select_checkpoint_by_hand():
    """Lowest CHAIR-i among checkpoints whose recall fell at most 0.05 from the start (0.80): checkpoint-20 has the
    lowest CHAIR-i (0.05) but recall 0.70, so checkpoint-10 (0.08, recall 0.78) wins."""
    start = {"chair_i": 0.2, "recall": 0.80}
    cands = {
        "checkpoint-10": {"chair_i": 0.08, "recall": 0.78},
        "checkpoint-20": {"chair_i": 0.05, "recall": 0.70},
        "checkpoint-30": {"chair_i": 0.09, "recall": 0.79},
    }
    assert select_checkpoint(cands, start, "chair_i", 0.05) == "checkpoint-10"
    assert select_checkpoint(cands, start, "chair_i", 0.20) == "checkpoint-20"
    # none eligible: all are candidates; a tie goes to the higher recall
    tie = {"a": {"chair_i": 0.1, "recall": 0.5}, "b": {"chair_i": 0.1, "recall": 0.6}}
    assert select_checkpoint(tie, start, "chair_i", 0.05) == "b"


def test_recall_floor_is_the_base_policys(tmp_path):
    """Later iterations select against iteration 0's start, so recall cannot fall by the margin every round."""
    base, later_start = {"chair_i": 0.2, "recall": 0.80}, {"chair_i": 0.1, "recall": 0.76}
    assert base_metrics(tmp_path, 0, later_start) is later_start
    with pytest.raises(RuntimeError, match="iteration 0"):
        base_metrics(tmp_path, 1, later_start)
    (tmp_path / "iter0").mkdir()
    StageState(tmp_path / "iter0" / "state.json").finish("evaluate", {"start": base}, 0.0)
    assert base_metrics(tmp_path, 2, later_start) == base
    cands = {"checkpoint-10": {"chair_i": 0.05, "recall": 0.72}, "checkpoint-20": {"chair_i": 0.08, "recall": 0.76}}
    assert select_checkpoint(cands, later_start, "chair_i", 0.05) == "checkpoint-10"  # 0.72 >= 0.76 - 0.05
    assert select_checkpoint(cands, base_metrics(tmp_path, 2, later_start), "chair_i", 0.05) == "checkpoint-20"


def test_config_validation(tmp_path):
    base = {
        "output_dir": str(tmp_path),
        "policy": "p",
        "prompts": "x.jsonl",
        "selection": {"questions": "q.jsonl", "annotations": ["a.json"]},
    }
    assert isinstance(LoopConfig(**base).selection.annotations, list)
    with pytest.raises(ValueError, match="oracle"):
        LoopConfig(**base, labeler="oracle")
    with pytest.raises(ValueError, match="unknown DPO settings"):
        LoopConfig(**base, dpo={"learning_rat": 1e-6})
    cfg_file = tmp_path / "loop.json"
    cfg_file.write_text(json.dumps({**base, "iteration": 2}))
    with pytest.raises(ValueError, match="unknown fields"):
        LoopConfig.from_file(cfg_file)


@pytest.fixture(scope="module")
def world_and_base(tmp_path_factory):
    pytest.importorskip("pycocotools")
    from muffin.world.bootstrap import BootstrapConfig, bootstrap
    from muffin.world.build import build_world

    root = tmp_path_factory.mktemp("loop")
    build_world(root / "world", splits={"sft": 150, "feedback": 6, "val": 6, "test": 6}, progress=False)
    bootstrap(root / "world", root / "base", BootstrapConfig(**TINY_BOOTSTRAP), progress=False)
    return root


def _loop(cfg: LoopConfig) -> Loop:
    """The loop with the world's ground truth (``muffin.world.demo run`` passes it the same way)."""
    from muffin.world.demo import world_truth

    return Loop(cfg, truth=world_truth(cfg))


def _config(root: Path, out: Path, **kw) -> LoopConfig:
    from muffin.world.demo import loop_config

    cfg = loop_config(
        root / "world",
        root / "base",
        out,
        iterations=1,
        prompts_per_iteration=6,
        num_samples=4,
        batch_size=8,
        max_new_tokens=48,
        **{"min_pairs": 1, **kw},
    )
    cfg["dpo"].update(max_steps=4, save_steps=2, per_device_train_batch_size=2)
    return LoopConfig(**cfg)


def test_reduced_loop_end_to_end_and_resume(world_and_base, tmp_path):
    """One iteration with oracle feedback (a labeler this small cannot tell claims apart yet, the oracle can): every
    stage leaves its file, each pair's chosen answer has fewer false claims than its rejected one (recounted with
    the world's ground truth), the report has a base and an iteration row; a rerun recomputes nothing, and a stage
    removed from the state is redone alone."""
    from muffin.world.oracle import WorldTruth

    out = tmp_path / "run"
    report = _loop(_config(world_and_base, out, labeler="oracle")).run()
    it = out / "iter0"
    for name in (
        "answers.jsonl",
        "claims.jsonl",
        "questions.jsonl",
        "checked.jsonl",
        "pairs.jsonl",
        "balanced.jsonl",
        "dataset.parquet",
        "manifest.json",
        "state.json",
    ):
        assert (it / name).is_file(), name
    state = json.loads((it / "state.json").read_text())
    assert list(state["done"]) == list(STAGES)
    assert state["done"]["generate"]["answers"] == 24
    assert state["done"]["pairs"]["pairs"] > 0 and state["done"]["export"]["rows"] > 0
    assert (it / "reference_logps" / "fingerprint.json").is_file()
    assert [p.name for p in sorted((it / "dpo").glob("checkpoint-*"))] == ["checkpoint-2", "checkpoint-4"]
    assert set(state["done"]["evaluate"]) == {"start", "checkpoint-2", "checkpoint-4"}
    assert state["done"]["select"]["checkpoint"] in ("checkpoint-2", "checkpoint-4")
    vs_truth = state["done"]["autocheck"]["labeler_vs_ground_truth"]
    assert vs_truth["accuracy"] == 1.0  # the oracle against itself
    assert vs_truth["by_kind"] and all(k["accuracy"] == 1.0 for k in vs_truth["by_kind"].values())
    assert sum(k["claims"] for k in vs_truth["by_kind"].values()) == vs_truth["claims"]
    signal = state["done"]["balance"]["pairs_vs_ground_truth"]  # what the balanced pairs teach, by kind of error
    assert signal["pairs"] == state["done"]["balance"]["pairs_out"]
    assert all(t["fewer"] + t["more"] <= signal["pairs"] for t in signal["by_kind"].values())
    from muffin.world.demo import loop_pair_signals  # the same numbers recomputed from the files, for older loops

    assert loop_pair_signals(out, world_and_base / "world") == [{"iteration": 1, "pair_signal": signal}]
    from muffin.world.demo import main as demo_main

    with pytest.raises(SystemExit, match="no iter<k>/balanced.jsonl: not a loop directory"):
        demo_main(["pairs", str(tmp_path / "not_a_loop"), "--world", str(world_and_base / "world")])
    assert [r["iteration"] for r in report["heldout"]] == [0, 1]
    for name in ("report.md", "report.json", "hallucination.png", "checkpoints.png"):
        assert (out / name).is_file(), name
    md = (out / "report.md").read_text()
    assert "| base |" in md and "## Labeler against ground truth, by claim kind" in md
    assert "| AUC within kinds | absent-object AUC |" in md
    assert "## What the pairs teach, per kind of error" in md
    assert report["iterations"][0]["labeler_kind_auc"] == vs_truth["kind_auc"]
    assert "## Held-out hallucinations by source" in md
    for row in report["heldout"]:  # the report benchmark is the world's val split: sources counted per policy
        h = row["hallucination_sources"]
        assert h["answers"] == row["n_answers"] and h["hallucinated"] == h["partner"] + h["other"]
        assert h["in_place_sentence"] <= h["hallucinated"] <= h["mentions"]

    truth = WorldTruth(world_and_base / "world")
    checked = [json.loads(x) for x in (it / "checked.jsonl").read_text().splitlines()]
    by_answer = {(r["prompt_id"], r["answer"]): r for r in checked}
    for p in map(json.loads, (it / "pairs.jsonl").read_text().splitlines()):
        n_false = [
            sum(t is False for t in truth.truths(by_answer[(p["prompt_id"], p[k])])) for k in ("chosen", "rejected")
        ]
        assert n_false[0] < n_false[1]

    stamp = (it / "answers.jsonl").stat().st_mtime_ns
    _loop(_config(world_and_base, out, labeler="oracle")).run()
    assert (it / "answers.jsonl").stat().st_mtime_ns == stamp

    state["done"].pop("select")
    (it / "state.json").write_text(json.dumps(state))
    _loop(_config(world_and_base, out, labeler="oracle")).run()
    again = json.loads((it / "state.json").read_text())
    assert "select" in again["done"] and (it / "answers.jsonl").stat().st_mtime_ns == stamp


def test_a_run_dir_of_the_loop_before_the_stage_table_resumes(world_and_base, tmp_path, caplog):
    """An iteration as the loop wrote it before the stage table (the labeler stage recorded as 'conquer', the dataset
    in pairs.parquet, no stage manifests) and its old config key: the stage reads as 'autocheck' with a warning, no
    finished stage runs again (every record file keeps its bytes) and training reads pairs.parquet."""
    import logging

    out = tmp_path / "old"
    _loop(_config(world_and_base, out, labeler="oracle")).iteration(0, stop_after="export")
    it = out / "iter0"
    state = json.loads((it / "state.json").read_text())
    state["done"] = {("conquer" if k == "autocheck" else k): v for k, v in state["done"].items()}
    (it / "state.json").write_text(json.dumps(state))
    (it / "dataset.parquet").rename(it / "pairs.parquet")
    for manifest in it.glob("*.manifest.json"):
        manifest.unlink()
    records = {p.name: p.read_bytes() for p in it.glob("*.jsonl")}
    cfg = json.loads(json.dumps(_config(world_and_base, out, labeler="oracle"), default=vars))
    cfg["split_prompt_file"] = cfg.pop("splitter_prompt_file")  # the pipeline's old name of the key
    (tmp_path / "loop.json").write_text(json.dumps(cfg))
    with caplog.at_level(logging.WARNING):
        loop = _loop(LoopConfig.from_file(tmp_path / "loop.json"))
        done = loop.iteration(0, stop_after="train")["done"]
    assert (
        "stage 'conquer' is now called 'autocheck'" in caplog.text
        and "'split_prompt_file' is deprecated" in caplog.text
    )
    assert list(done) == [s for s in STAGES if s not in ("evaluate", "select")] and "conquer" not in done
    assert {p.name: p.read_bytes() for p in it.glob("*.jsonl")} == records
    assert not list(it.glob("*.manifest.json")) and not (it / "dataset.parquet").exists()
    assert done["train"]["steps"] == 4 and (it / "dpo" / "checkpoint-4").is_dir()


def test_an_old_reward_round_is_read_with_its_file_and_stage_names(tmp_path):
    """A reward round of the loop before the stage table wrote its rewards to checked.jsonl under the stage name
    'conquer' and its dataset to pairs.parquet: both are found there until the new names exist."""
    from muffin.feedback.stages import FILES, OLD_STAGE_NAMES
    from muffin.loop import iteration_files

    (tmp_path / "checked.jsonl").write_text("")
    (tmp_path / "pairs.parquet").write_bytes(b"")
    assert iteration_files(tmp_path, "reward") == {**FILES, "rewarded": "checked.jsonl", "dataset": "pairs.parquet"}
    assert iteration_files(tmp_path, "claims") == {**FILES, "dataset": "pairs.parquet"}
    (tmp_path / "rewarded.jsonl").write_text("")
    assert iteration_files(tmp_path, "reward")["rewarded"] == "rewarded.jsonl"
    (tmp_path / "state.json").write_text(
        json.dumps({"done": {"generate": {}, "divide": {"skipped": "x"}, "conquer": {}}})
    )
    state = StageState(tmp_path / "state.json", OLD_STAGE_NAMES["reward"])
    assert list(state.data["done"]) == ["generate", "divide", "reward"]


def test_a_round_with_too_few_pairs_trains_nothing_and_keeps_its_policy(world_and_base, tmp_path):
    """Fewer balanced pairs than min_pairs: export and train are recorded as skipped (no parquet, no DPO run), only
    the start policy is evaluated and it carries on; the report says why. A later rerun with a lower min_pairs is
    a new run (another output dir): skipped rounds are final, like every finished stage."""
    out = tmp_path / "run"
    report = _loop(_config(world_and_base, out, labeler="oracle", min_pairs=10**6)).run()
    it = out / "iter0"
    state = json.loads((it / "state.json").read_text())
    n = state["done"]["balance"]["pairs_out"]
    assert "min_pairs 1000000" in state["done"]["export"]["skipped"] and state["done"]["export"]["pairs"] == n
    assert state["done"]["train"]["steps"] == 0 and state["done"]["train"]["skipped"]
    assert not (it / "dataset.parquet").exists() and not (it / "dpo").exists()
    assert list(state["done"]["evaluate"]) == ["start"]
    select = state["done"]["select"]
    assert select["checkpoint"] == "start" and select["policy"] == str(world_and_base / "base") and select["skipped"]
    assert report["iterations"][0]["selected"] == "start (too few pairs)"
    assert "start (too few pairs)" in (out / "report.md").read_text()
    with pytest.raises(ValueError, match="min_pairs must be >= 1"):
        _config(world_and_base, out, min_pairs=0)


@pytest.mark.parametrize("score", ["count", "expected"])
def test_self_feedback_autocheck_stage(world_and_base, tmp_path, score):
    """With labeler "initial" the autocheck stage asks the base policy itself: P(yes) and P(no) come from the model
    (strictly between 0 and 1), verdicts follow P(yes) > P(no), and the accuracy against the ground truth is kept;
    the answer score is the loop's ``score``: the count of claims judged false, or their expected number."""
    import dataclasses

    from muffin.feedback.autocheck import expected_score

    out = tmp_path / "self"
    loop = _loop(dataclasses.replace(_config(world_and_base, out), score=score, min_diff=0.5))
    it = out / "iter0"
    loop.iteration(0, stop_after="autocheck")
    checked = [json.loads(x) for x in (it / "checked.jsonl").read_text().splitlines()]
    scored = [r for r in checked if r.get("verdicts")]
    assert scored and all(r["labeler"] == "base" for r in scored)
    for r in scored:
        for y, n, v in zip(r["p_yes"], r["p_no"], r["verdicts"]):
            assert 0 < y < 1 and 0 < n < 1 and v == (y > n)
        want = -r["n_false"] if score == "count" else expected_score(r["p_yes"], r["p_no"])
        assert r["score"] == want
    if score == "expected":
        assert any(r["score"] != round(r["score"]) for r in scored)


@pytest.mark.slow
def test_demo_script(tmp_path):
    """The CPU demo itself (minutes): it must end with the PASS line of `muffin.world.demo check`."""
    out = tmp_path / "demo"
    if os.environ.get("RLAIFV_DEMO_BASE"):  # reuse a bootstrapped world + base to save minutes
        shutil.copytree(os.environ["RLAIFV_DEMO_BASE"], out)
    assert "PASS" in run_script("script/demo/world_cpu.sh", str(out), timeout=3600)


def test_keep_start_lets_the_start_policy_carry_on(tmp_path):
    """With keep_start, a round whose checkpoints all do worse than its start on the selection benchmark keeps the
    start policy (no checkpoint materialised); without it the best checkpoint is taken anyway (the paper's loop)."""
    from types import SimpleNamespace

    it = tmp_path / "iter0"
    it.mkdir()
    state = StageState(it / "state.json")
    start = {"chair_i": 0.10, "recall": 0.80}
    state.finish(
        "evaluate",
        {
            "start": start,
            "checkpoint-10": {"chair_i": 0.12, "recall": 0.80},
            "checkpoint-20": {"chair_i": 0.11, "recall": 0.79},
        },
        0.0,
    )
    loop = SimpleNamespace(out=tmp_path, cfg=SimpleNamespace(keep_start=True, metric="chair_i", max_recall_drop=0.05))
    got = Loop._stage_select(loop, 0, it, "/models/base", [], state)
    assert got == {"checkpoint": "start", "policy": "/models/base", "metrics": start, "start": start}
    loop.cfg.keep_start = False  # a full-weights checkpoint is its own policy directory
    got = Loop._stage_select(loop, 0, it, "/models/base", [], state)
    assert got["checkpoint"] == "checkpoint-20" and got["policy"] == str(it / "dpo" / "checkpoint-20")
    assert (
        select_checkpoint({"start": start, "checkpoint-10": {"chair_i": 0.09, "recall": 0.79}}, start, "chair_i", 0.05)
        == "checkpoint-10"
    )


def test_one_shot_schedule_and_seed_comparison(tmp_path):
    """one_shot keeps the budget of the iterative config (prompts, DPO steps, checkpoints) in one round; compare
    reads finished loops laid out as <seed>/<variant> and gives mean and sample sd over seeds."""
    import json

    from muffin.world.demo import compare, compare_table, loop_config, one_shot, plot_compare

    it = loop_config(tmp_path / "world", tmp_path / "base", tmp_path / "loop")
    assert it["keep_start"] is True
    one = one_shot(it)
    assert (one["iterations"], one["prompts_per_iteration"]) == (1, 4 * it["prompts_per_iteration"])
    # the 4 rounds evaluate 6 checkpoints each; the one round evaluates 24, every 10 steps as they do
    assert (one["dpo"]["max_steps"], one["dpo"]["save_steps"]) == (4 * 60, 10)
    assert it["dpo"]["max_steps"] == 60  # the input config is left alone

    def report(path, base, final, pairs):
        path.mkdir(parents=True)
        keys = ("chair_i", "response_hallucination", "recall")
        rep = {
            "heldout": [dict(zip(keys, base)), dict(zip(keys, final))],
            "iterations": [{"pairs_balanced": p, "labeler_auc": 0.7} for p in pairs],
        }
        (path / "report.json").write_text(json.dumps(rep))

    report(tmp_path / "s0" / "ai", (0.10, 0.20, 0.8), (0.08, 0.15, 0.78), [100, 120])
    report(tmp_path / "s1" / "ai", (0.20, 0.40, 0.7), (0.12, 0.20, 0.70), [80, 100])
    summary = compare([tmp_path / "s0" / "ai", tmp_path / "s1" / "ai"])
    ai = summary["ai"]
    assert ai["seeds"] == ["s0", "s1"]
    assert ai["chair_i_change"]["mean"] == pytest.approx((-0.2 - 0.4) / 2)
    assert ai["chair_i_change"]["sd"] == pytest.approx(0.1414214, rel=1e-5)
    assert ai["response_change"]["mean"] == pytest.approx((-0.25 - 0.5) / 2)
    assert ai["recall_change"]["mean"] == pytest.approx(-0.01)
    assert ai["pairs"]["mean"] == pytest.approx(200)
    assert "| ai | 2 | -30.0 ± 14.1 | -37.5 ± 17.7 | -1.0 ± 1.4 | 200 ± 28.3 |" in compare_table(summary)
    plot_compare(summary, tmp_path / "c.png", bar=-70)
    assert (tmp_path / "c.png").stat().st_size > 1000
    with pytest.raises(FileNotFoundError, match="not finished"):
        compare([tmp_path / "s2" / "ai"])


def test_demo_check_prints_the_bar_and_the_labeler(tmp_path, capsys):
    """`muffin.world.demo check`: base and final rows, the labeler per iteration (with the absent-object AUC when
    the report has it), and exit status 1 with the failing metrics named when the bar is not met."""
    from muffin.world.demo import main

    report = {
        "heldout": [
            {"iteration": 0, "chair_i": 0.10, "response_hallucination": 0.20, "recall": 0.80},
            {"iteration": 1, "chair_i": 0.04, "response_hallucination": 0.12, "recall": 0.78},
        ],
        "iterations": [
            {
                "iteration": 1,
                "claims": 50,
                "labeler_accuracy": 0.7,
                "labeler_balanced_accuracy": 0.65,
                "labeler_auc": 0.75,
                "labeler_absent_object_auc": 0.83,
            }
        ],
    }
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    with pytest.raises(SystemExit) as exit_:
        main(["check", "--report", str(path)])
    out = capsys.readouterr().out
    assert exit_.value.code == 1
    assert (
        "claim accuracy vs ground truth 70.0% (balanced 65.0%, AUC 0.75) on 50 claims; absent-object AUC 0.83" in out
    )
    assert "FAIL: response_hallucination" in out and "chair_i" not in out.split("FAIL:")[1]
    report["heldout"][1]["response_hallucination"] = 0.09
    path.write_text(json.dumps(report))
    with pytest.raises(SystemExit) as exit_:
        main(["check", "--report", str(path)])
    assert exit_.value.code == 0 and "PASS" in capsys.readouterr().out


def test_demo_config_set_overrides_fields_and_names_a_wrong_key(tmp_path, capsys):
    """``--set KEY=VALUE``: dotted keys reach into dpo, values parse as JSON, one-shot scales the overridden budget;
    a key the config does not have stops with the fields it has."""
    from muffin.world.demo import apply_sets, main

    cfg = {"iterations": 4, "dpo": {"max_steps": 60, "learning_rate": 2e-5}, "labeler": "initial"}
    got = apply_sets(cfg, ["dpo.max_steps=120", "dpo.learning_rate=1e-5", "labeler=oracle", "iterations=2"])
    assert got == {"iterations": 2, "dpo": {"max_steps": 120, "learning_rate": 1e-5}, "labeler": "oracle"}
    assert cfg["dpo"]["max_steps"] == 60, "the input is not modified"
    with pytest.raises(KeyError, match="dpo has no field 'max_step' \\(did you mean max_steps"):
        apply_sets(cfg, ["dpo.max_step=1"])
    # fields the config leaves at their defaults: any LoopConfig, DPOConfig or Benchmark field
    got = apply_sets(cfg, ["score=expected", "min_diff=0.5", "dpo.beta=0.2", "report_benchmark.limit=50"])
    assert got["score"] == "expected" and got["min_diff"] == 0.5 and got["dpo"]["beta"] == 0.2
    assert got["report_benchmark"] == {"limit": 50}
    with pytest.raises(KeyError, match="the loop config has no field 'scores' \\(did you mean score"):
        apply_sets(cfg, ["scores=expected"])
    with pytest.raises(KeyError, match="labeler has no field 'x'"):  # not a dict
        apply_sets(cfg, ["labeler.x=1"])
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        apply_sets(cfg, ["dpo.max_steps"])

    world = tmp_path / "world"
    args = ["config", "--world", str(world), "--policy", "base", "--out", str(tmp_path / "loop")]
    main([*args, "--schedule", "one-shot", "--set", "prompts_per_iteration=600", "--set", "dpo.max_steps=120"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["prompts_per_iteration"] == 4 * 600 and printed["dpo"]["max_steps"] == 4 * 120
    with pytest.raises(SystemExit, match="no field 'prompts_per_round'"):
        main([*args, "--set", "prompts_per_round=600"])


def test_compare_script_builds_seeds_side_by_side_with_passed_flags(tmp_path):
    """compare.sh with BUILD_JOBS=2 and VARIANTS="" builds two seeds at once, each with the BUILD_ARGS /
    BOOTSTRAP_ARGS / LABELER_ARGS flags (WORLD_LABELER=1: the world-trained labeler too, which no variant would
    ask for), spread over GPUS round robin (seed 0 on the first, seed 1 on the second; the builds here run on the
    CPU), and stops after the builds."""
    env = dict(
        os.environ,
        SEEDS="0 1",
        GPUS="3 5",
        VARIANTS="",
        BUILD_JOBS="2",
        BUILD_ARGS="--n-sft 12 --n-feedback 3 --n-val 3 --n-test 3",
        BOOTSTRAP_ARGS="--vision-hidden 32 --text-hidden 64 --text-layers 2 --batch-size 4 --vision-steps 2 "
        "--align-steps 2 --steps 3 --device cpu",
        LABELER_ARGS="--easy-steps 2 --steps 1 --batch-size 4 --device cpu",
        WORLD_LABELER="1",
        OMP_NUM_THREADS="1",
    )
    out = tmp_path / "cmp"
    stdout = run_script("script/world/compare.sh", str(out), env=env)
    assert "VARIANTS is empty" in stdout
    assert "built: seed 0 on GPU 3" in stdout and "built: seed 1 on GPU 5" in stdout, stdout
    for s in (0, 1):
        world = json.loads((out / f"s{s}" / "world" / "manifest.json").read_text())
        base = json.loads((out / f"s{s}" / "base" / "manifest.json").read_text())
        lab = json.loads((out / f"s{s}" / "labeler" / "manifest.json").read_text())
        assert world["config"]["splits"] == {"sft": 12, "feedback": 3, "val": 3, "test": 3}
        assert world["config"]["world"]["seed"] == s and base["config"]["seed"] == s and lab["config"]["seed"] == s
        assert base["config"]["text_hidden"] == 64 and base["config"]["steps"] == 3 and base["device"] == "cpu"
        assert lab["config"]["steps"] == 1 and lab["device"] == "cpu"
        assert (out / f"build_s{s}.log").is_file()
    assert not list(out.glob("s0/*.json")), "no loop ran"


def test_demo_installs_shipped_assets_only_into_a_world_built_like_theirs(tmp_path, capsys):
    """`muffin.world.demo install` copies base/ and labeler/ next to a world whose scenes, descriptions and SFT / val
    splits match the assets' world (the test split may differ); a mismatch names the setting and copies nothing."""
    from muffin.world.build import build_world
    from muffin.world.captions import CaptionConfig
    from muffin.world.demo import install_assets, main

    trained_on = tmp_path / "trained_on"
    build_world(trained_on, splits={"sft": 2, "feedback": 1, "val": 1, "test": 1}, progress=False)
    assets = tmp_path / "assets"
    for name in ("base", "labeler"):
        (assets / name).mkdir(parents=True)
        (assets / name / "manifest.json").write_text(json.dumps({"stage": name}))
        (assets / name / "model.safetensors").write_bytes(b"weights of " + name.encode())
    shutil.copy(trained_on / "manifest.json", assets / "world_manifest.json")

    demo = tmp_path / "demo"  # the demo's own world: a larger test split, the rest the same
    build_world(demo / "world", splits={"sft": 2, "feedback": 1, "val": 1, "test": 3}, progress=False)
    assert install_assets(assets, demo / "world", demo) == ["base", "labeler"]
    assert (demo / "labeler" / "model.safetensors").read_bytes() == b"weights of labeler"
    assert install_assets(assets, demo / "world", demo) == []  # already there
    main(["install", "--assets", str(assets), "--world", str(demo / "world"), "--out", str(demo)])
    assert "nothing (already there)" in capsys.readouterr().out

    other = tmp_path / "other"
    build_world(
        other / "world",
        splits={"sft": 3, "feedback": 1, "val": 1, "test": 1},
        captions=CaptionConfig(hallucination_rate=0.2),
        progress=False,
    )
    with pytest.raises(ValueError, match=r"in captions, splits\.sft .*REBUILD=1"):
        install_assets(assets, other / "world", other)
    assert not (other / "base").exists()
    with pytest.raises(SystemExit, match="muffin.world.demo install: .*differs"):
        main(["install", "--assets", str(assets), "--world", str(other / "world"), "--out", str(other)])
    with pytest.raises(FileNotFoundError, match="world_manifest.json is missing"):
        install_assets(tmp_path / "nowhere", demo / "world", demo)


def test_build_base_world_only_builds_the_world_alone(tmp_path):
    """WORLD_ONLY=1 (the demo's path when it installs the shipped base and labeler): the world with BUILD_ARGS, no
    bootstrap, no labeler; a second call leaves the built world alone."""
    env = dict(os.environ, WORLD_ONLY="1", SEED="3", BUILD_ARGS="--n-sft 4 --n-feedback 2 --n-val 2 --n-test 5")
    out = tmp_path / "demo"
    stamps = []
    for _ in range(2):
        run_script("script/world/build_base.sh", str(out), env=env, timeout=300)
        world = json.loads((out / "world" / "manifest.json").read_text())
        assert world["config"]["splits"] == {"sft": 4, "feedback": 2, "val": 2, "test": 5}
        assert world["config"]["world"]["seed"] == 3
        assert not (out / "base").exists() and not (out / "labeler").exists()
        stamps.append((out / "world" / "manifest.json").stat().st_mtime_ns)
    assert stamps[0] == stamps[1]


def test_reward_feedback_stages(world_and_base, tmp_path):
    """feedback "reward": no claims; the reward stage writes each answer's reward of reward_model against the
    initial policy (the base), and the pairs are the engine's rules on them (chosen above rejected by sum and mean)."""
    import dataclasses

    import torch

    from muffin.family import load_family
    from muffin.feedback.reward_feedback import build_reward_pairs

    fam = load_family(world_and_base / "base", device="cpu")  # the base with other output weights: same tokenizer
    with torch.no_grad():
        head = fam.model.get_output_embeddings().weight
        head.add_(torch.randn(head.shape, generator=torch.Generator().manual_seed(0)) * head.std())
    other = tmp_path / "other"
    fam.save_pretrained(other)
    with pytest.raises(ValueError, match="needs reward_model"):
        dataclasses.replace(_config(world_and_base, tmp_path / "x"), feedback="reward")
    loop = _loop(
        dataclasses.replace(_config(world_and_base, tmp_path / "r"), feedback="reward", reward_model=str(other))
    )
    it = tmp_path / "r" / "iter0"
    loop.iteration(0, stop_after="pairs")
    assert list(json.loads((it / "state.json").read_text())["done"]) == ["generate", "reward", "pairs"]
    assert not (it / "claims.jsonl").exists()
    checked = [json.loads(x) for x in (it / "rewarded.jsonl").read_text().splitlines()]
    assert all("reward_mean" in r for r in checked if not r.get("error"))
    pairs = [json.loads(x) for x in (it / "pairs.jsonl").read_text().splitlines()]
    assert pairs and pairs == build_reward_pairs(checked, seed=0)[0]


def test_autocheck_stage_on_a_served_labeler(world_and_base, tmp_path):
    """labeler_server: the autocheck stage asks the base behind muffin.serve; with every alternative returned, P(yes)
    and P(no) equal the in-process self-feedback read-out (the world's word-level tokenizer has one token each for
    yes / Yes / no / No), and the requests are cached next to the output."""
    import dataclasses

    from muffin.family import load_family
    from muffin.serve import start

    base = load_family(world_and_base / "base", device="cpu")
    vocab = base.model.get_output_embeddings().weight.shape[0]  # every alternative: no top-k truncation
    httpd = start(base, "base", max_logprobs=vocab)
    url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    try:
        runs = {}
        served = {"labeler_server": url, "labeler_top_logprobs": vocab}
        for name, extra in (("local", {}), ("served", served)):
            loop = _loop(dataclasses.replace(_config(world_and_base, tmp_path / name), **extra))
            it = tmp_path / name / "iter0"
            loop.iteration(0, stop_after="autocheck")
            runs[name] = [json.loads(x) for x in (it / "checked.jsonl").read_text().splitlines()]
        assert (tmp_path / "served" / "iter0" / "checked.requests.sqlite").is_file()
        both = [(a, b) for a, b in zip(runs["local"], runs["served"]) if a.get("p_yes") and b.get("p_yes")]
        assert both and all(b["labeler"] == "base" for _, b in both)
        for a, b in both:  # float32 rounding: batched-and-packed in-process, one question per request served
            assert b["p_yes"] == pytest.approx(a["p_yes"], rel=1e-3, abs=1e-5)
            assert b["p_no"] == pytest.approx(a["p_no"], rel=1e-3, abs=1e-5)
    finally:
        httpd.shutdown()
