"""One definition of the feedback stages and their knobs: the stage table's config is the pipeline CLI's flags and the
loop config's keys (same names, same defaults, one validation), every knob reaches a stage, old names still read."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
from pathlib import Path

import pytest

from muffin.feedback import stages
from muffin.feedback.config import RENAMED, FeedbackConfig
from muffin.feedback.pipeline import PipelineConfig, make_parser
from muffin.loop import STAGES, LoopConfig

SELECTION = {"questions": "q.jsonl", "annotations": ["a.json"]}


def _knob_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(FeedbackConfig)}


def test_every_knob_is_a_pipeline_flag_and_a_loop_key_with_one_default():
    """For each FeedbackConfig field: the pipeline has the flag --<name with dashes> with the field's default, and
    LoopConfig has the key with the same default (neither redefines it: same help text object)."""
    parser = make_parser()
    flags = {a.dest: a for a in parser._actions if a.option_strings and a.help != argparse.SUPPRESS}
    loop = {f.name: f for f in dataclasses.fields(LoopConfig)}
    for name, f in _knob_fields().items():
        assert name in flags, f"knob {name} is not a pipeline flag"
        assert "--" + name.replace("_", "-") in flags[name].option_strings
        assert name in loop, f"knob {name} is not a loop config key"
        assert loop[name].metadata is f.metadata and loop[name].default == f.default, name
        if f.default is not dataclasses.MISSING:
            assert flags[name].default == f.default, name
    # the parsed defaults build the same config as the keyword defaults
    args = parser.parse_args(["--prompts", "p.jsonl", "--policy", "pol", "--work-dir", "w"])
    assert PipelineConfig(**vars(args)) == PipelineConfig(prompts="p.jsonl", policy="pol", work_dir="w")


def test_every_knob_reaches_a_stage():
    """A knob that no stage reads would be a flag that does nothing: each appears as ``cfg.<name>`` (or is resolved
    through ``StageRun``: prompts/policy/labeler/seed and the served labeler) in muffin/feedback/stages.py."""
    src = Path(stages.__file__).read_text()
    used = set(re.findall(r"cfg\.(\w+)", src))
    for name in _knob_fields():
        assert name in used, f"knob {name} is read by no stage"


def test_keyword_only_construction_and_validation_in_one_place():
    """Positional construction is refused; a bad knob gives one message, naming key and flag, from every entry."""
    with pytest.raises(TypeError):
        PipelineConfig("p.jsonl", "pol", "w")  # type: ignore[misc]
    base = {"prompts": "p.jsonl", "policy": "pol"}
    cases = {"num_samples": 1, "score": "sum", "min_diff": 0, "feedback": "votes", "labeler_batch_size": -1}
    for key, value in cases.items():
        messages = []
        for cls, extra in ((FeedbackConfig, {}), (PipelineConfig, {"work_dir": "w"}),
                           (LoopConfig, {"output_dir": "o", "selection": SELECTION})):  # fmt: skip
            with pytest.raises(ValueError) as e:
                cls(**base, **extra, **{key: value})
            messages.append(str(e.value))
        assert len(set(messages)) == 1 and f"--{key.replace('_', '-')}" in messages[0], messages


def test_stage_names_are_the_same_in_pipeline_and_loop():
    """The loop's feedback stages are the table's (less the data report, which the loop writes its own way)."""
    table = [s.name for s in stages.stages_for("claims")]
    assert table == ["generate", "divide", "changeq", "autocheck", "pairs", "balance", "export", "report"]
    assert list(STAGES) == table[:-1] + ["train", "evaluate", "select"]
    assert [s.name for s in stages.stages_for("reward")] == ["generate", "reward", "pairs", "balance", "export", "report"]  # fmt: skip


def test_old_pipeline_flag_and_loop_key_still_read(tmp_path, caplog):
    """--split-prompt-file / split_prompt_file are read as splitter_prompt_file with a warning naming the new name;
    giving both names in a loop config is refused."""
    template = tmp_path / "split.txt"
    template.write_text("{question} {answer}")
    assert RENAMED["split_prompt_file"] == "splitter_prompt_file"
    with caplog.at_level(logging.WARNING):
        args = make_parser().parse_args(
            ["--prompts", "p", "--policy", "x", "--work-dir", "w", "--split-prompt-file", str(template),
             "--split-max-prompt-words", "300"]
        )  # fmt: skip
    assert args.splitter_prompt_file == str(template) and args.splitter_max_prompt_words == 300
    assert "--split-prompt-file is deprecated: use --splitter-prompt-file" in caplog.text

    cfg = {"output_dir": str(tmp_path / "o"), "policy": "p", "prompts": "x.jsonl", "selection": SELECTION}
    path = tmp_path / "loop.json"
    path.write_text(json.dumps({**cfg, "split_prompt_file": str(template)}))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert LoopConfig.from_file(path).splitter_prompt_file == str(template)
    assert "'split_prompt_file' is deprecated, read as 'splitter_prompt_file'" in caplog.text
    path.write_text(json.dumps({**cfg, "split_prompt_file": "a", "splitter_prompt_file": "b"}))
    with pytest.raises(ValueError, match="keep only 'splitter_prompt_file'"):
        LoopConfig.from_file(path)


def test_a_world_config_runs_through_the_truth_hook(tmp_path):
    """The loop never imports the world: a config naming one is sent to the world's runner, and labeler 'oracle'
    without a truth object says where it comes from."""
    import subprocess
    import sys

    src = Path(__file__).resolve().parents[1] / "muffin" / "loop.py"
    assert "muffin.world" not in re.sub(r'""".*?"""|#.*', "", src.read_text(), flags=re.S)
    code = "import sys, muffin.loop; print(sorted(m for m in sys.modules if m.startswith('muffin.world')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

    from muffin.loop import main

    cfg = {"output_dir": str(tmp_path / "o"), "policy": "p", "prompts": "x.jsonl", "selection": SELECTION}
    path = tmp_path / "loop.json"
    path.write_text(json.dumps({**cfg, "world": str(tmp_path / "world")}))
    with pytest.raises(SystemExit, match="python -m muffin.world.demo run --config"):
        main(["--config", str(path)])
