"""Fingerprint parts: the sampled weights digest, the difference listing, the check that refuses or records."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from utils.fingerprint import (
    SAMPLE_BYTES,
    SMALL_FILE,
    StaleOutputError,
    check_fingerprint,
    differences,
    weights_digest,
)


def test_differences_by_hand() -> None:
    old = {"seed": 0, "decoding": {"temperature": 0.7, "top_p": 1.0}, "code": {"a.py": "x"}}
    new = {"seed": 1, "decoding": {"temperature": 0.7, "top_p": 0.9}, "code": {"a.py": "x", "b.py": "y"}}
    assert differences(old, new) == [
        "code.b.py: null -> 'y'",
        "decoding.top_p: 1.0 -> 0.9",
        "seed: 0 -> 1",
    ]
    assert differences(old, old) == []


def test_weights_digest_sees_content_not_copies(tmp_path) -> None:
    """A 10 MiB weight file (over the 4 MiB whole-hash limit) is read in 16 blocks of 64 KiB at offsets
    (size - 64 KiB) * k / 15: a byte changed at offset 0 or in the last block changes the digest; a copy of the
    folder (new mtimes) does not; config.json is hashed whole."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    size = 10 << 20
    assert size > SMALL_FILE
    data = bytearray(os.urandom(size))
    (ckpt / "model.safetensors").write_bytes(data)
    (ckpt / "config.json").write_text('{"hidden_size": 8}')
    base = weights_digest(ckpt)
    shutil.copytree(ckpt, tmp_path / "copy")
    assert weights_digest(tmp_path / "copy") == base
    for offset in (0, size - 1, (size - SAMPLE_BYTES) * 7 // 15 + 100):
        changed = bytearray(data)
        changed[offset] ^= 0xFF
        (tmp_path / "copy" / "model.safetensors").write_bytes(changed)
        assert weights_digest(tmp_path / "copy") != base, offset
    (tmp_path / "copy" / "model.safetensors").write_bytes(data)
    (tmp_path / "copy" / "config.json").write_text('{"hidden_size": 9}')
    assert weights_digest(tmp_path / "copy") != base


def test_check_fingerprint_records_refuses_and_starts_over(tmp_path) -> None:
    fp = tmp_path / "out.fingerprint.json"
    removed: list[str] = []
    kw = dict(output="out.jsonl", start_over=lambda: removed.append("x"))
    check_fingerprint(fp, {"seed": 0}, overwrite=False, has_output=False, **kw)
    assert json.loads(fp.read_text()) == {"seed": 0}
    check_fingerprint(fp, {"seed": 0}, overwrite=False, has_output=True, **kw)  # same: nothing to say
    with pytest.raises(StaleOutputError, match=r"(?s)out.jsonl was made with other.*seed: 0 -> 1.*--overwrite"):
        check_fingerprint(fp, {"seed": 1}, overwrite=False, has_output=True, **kw)
    check_fingerprint(fp, {"seed": 1}, overwrite=True, has_output=True, **kw)
    assert removed == ["x"] and json.loads(fp.read_text()) == {"seed": 1}
    fp.unlink()
    with pytest.raises(StaleOutputError, match="holds records but no fingerprint"):
        check_fingerprint(fp, {"seed": 1}, overwrite=False, has_output=True, **kw)
    check_fingerprint(fp, {"key": "https://u:secret@host/v1"}, overwrite=True, has_output=False, **kw)
    assert "secret" not in fp.read_text()  # a judge id's credentials never reach the fingerprint file
