"""Secrets never reach manifests, results files or logs: by field name, by format, and by environment value."""

from __future__ import annotations

import json
import logging

from eval.judges import JudgeResponse, JudgeStats
from eval.scoring import failure_fields, write_results
from utils.io import write_manifest
from utils.secrets import REDACTED, redact, redact_text

KEY = "sk-proj-abcdefghijklmnopqrstuvwx1234"  # the shape of an OpenAI key (made up)
HF = "hf_AbCdEfGhIjKlMnOpQrStUvWx"  # the shape of a Hugging Face token (made up)


def test_redact_by_name_format_and_value(monkeypatch) -> None:
    monkeypatch.setenv("MY_JUDGE_API_KEY", "plain-env-secret-123")
    monkeypatch.setenv("SHORT_TOKEN", "1")  # too short to redact in free text
    cfg = {
        "hub_token": "anything",
        "Authorization": "Bearer xyz",
        "api_key_env": "MY_JUDGE_API_KEY",  # the variable's name, not its value: kept
        "max_new_tokens": 512,  # a count, not a credential
        "pad_token": "<pad>",
        "base_url": "https://user:pw@judge.example/v1?api_key=QQQQ&model=m",
        "notes": [f"key {KEY} and {HF}", "header Authorization: Bearer abcdefgh12345678", "env plain-env-secret-123"],
        "empty_token": None,
    }
    out = redact(cfg)
    assert out["hub_token"] == REDACTED and out["Authorization"] == REDACTED
    assert out["api_key_env"] == "MY_JUDGE_API_KEY" and out["max_new_tokens"] == 512 and out["pad_token"] == "<pad>"
    assert out["base_url"] == f"https://{REDACTED}@judge.example/v1?api_key={REDACTED}&model=m"
    assert out["notes"] == [
        f"key {REDACTED} and {REDACTED}",
        f"header Authorization: Bearer {REDACTED}",
        f"env {REDACTED}",
    ]
    assert out["empty_token"] is None  # nothing to hide: the manifest still says it was not set
    assert redact_text("sample 1 of 3") == "sample 1 of 3"


def test_manifests_results_and_judge_errors_hold_no_secret(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    write_manifest(
        tmp_path / "m.json",
        stage="x",
        config={"api_key": KEY, "judge_url": "https://a:b@h/v1"},
        counts={},
        started=0.0,
        note=f"called with {KEY}",
    )

    class FakeJudge:
        id = "openai:gpt@https://u:secretpw@host/v1"
        stats = JudgeStats()

    write_results(
        tmp_path, benchmark="b", metrics={}, config={"headers": {"x-api-key": KEY}}, judge=FakeJudge(), started=0
    )
    fields = failure_fields(JudgeResponse(None, error=f"401 Incorrect API key provided: {KEY}"), 1, "rating")
    for text in ((tmp_path / "m.json").read_text(), (tmp_path / "results.json").read_text(), json.dumps(fields)):
        assert KEY not in text and "secretpw" not in text and ":b@" not in text
        assert REDACTED in text


def test_logs_and_uncaught_tracebacks_are_redacted(capsys, monkeypatch) -> None:
    import sys

    from utils.dist import setup_logging

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # restored after the test
    monkeypatch.setattr(logging.getLogger(), "handlers", list(logging.getLogger().handlers))
    setup_logging()
    logging.getLogger("test").warning("judge refused: key %s, header %s", KEY, "Bearer abcdefgh12345678")
    try:
        raise RuntimeError(f"401 with {HF}")
    except RuntimeError:
        sys.excepthook(*sys.exc_info())
    err = capsys.readouterr().err
    assert "judge refused" in err and "RuntimeError: 401 with" in err
    assert KEY not in err and HF not in err and "abcdefgh12345678" not in err
