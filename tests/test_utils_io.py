"""Crash-safe JSONL: resume by key, torn last line, atomic writes; distributed sharding helpers."""

from __future__ import annotations

import json

import pytest

from utils.dist import merge_in_order, shard, shard_blocks, shard_path
from utils.io import JsonlWriter, atomic_write_json, read_jsonl


def test_jsonl_resume_after_torn_write(tmp_path) -> None:
    path = tmp_path / "out.jsonl"
    with JsonlWriter(path, key="id") as w:
        w.write({"id": 1, "x": "a"})
        w.write({"id": 2, "x": "b"})
    with path.open("a") as f:  # a crash in the middle of record 3
        f.write('{"id": 3, "x": "c')
    assert [r["id"] for r in read_jsonl(path)] == [1, 2]
    with JsonlWriter(path, key="id") as w:
        assert w.done == {1, 2}
        for i in (1, 2, 3, 4):
            w.write({"id": i, "x": str(i)})
    recs = read_jsonl(path)
    assert [r["id"] for r in recs] == [1, 2, 3, 4]
    assert recs[0]["x"] == "a"  # finished work is kept, not redone


def test_corrupt_middle_line_is_an_error(tmp_path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": 1}\n{broken\n{"id": 3}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: invalid JSON"):
        read_jsonl(path)


def test_atomic_write_json(tmp_path) -> None:
    atomic_write_json(tmp_path / "a" / "m.json", {"k": 1})
    assert json.loads((tmp_path / "a" / "m.json").read_text()) == {"k": 1}
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["m.json"]  # no temp file left


def test_shard_and_merge_restore_order() -> None:
    items = [{"id": i} for i in range(7)]
    parts = [shard(items, r, 3) for r in range(3)]
    assert [len(p) for p in parts] == [3, 2, 2]
    assert merge_in_order(parts, [i for i in range(7)], "id") == items
    blocks = [shard_blocks(items, r, 3) for r in range(3)]
    assert sum(blocks, []) == list(items) and max(map(len, blocks)) - min(map(len, blocks)) <= 1
    assert shard_blocks(list(range(7)), 1, 3) == [2, 3]
    assert shard_path("out.jsonl", 1, 2) == "out.rank1-of-2.jsonl"
    assert shard_path("out.jsonl", 0, 1) == "out.jsonl"


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_writes_keep_the_umask_mode(tmp_path, umask) -> None:
    """A plain ``open()`` under umask 022 gives 0644 (0666 & ~022), under 002 0664, under 077 0600: the atomic
    writers (utils.io and the parquet export) must give the same, not mkstemp's 0600."""
    import os
    import stat

    from muffin.feedback.export import write_parquet

    old = os.umask(umask)
    try:
        atomic_write_json(tmp_path / "m.json", {"k": 1})
        write_parquet(iter([]), tmp_path / "d.parquet")
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    for name in ("m.json", "d.parquet", "plain.txt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == want, name


def test_manifest_records_the_threads(tmp_path, monkeypatch) -> None:
    import json
    import time

    import torch

    from utils.io import write_manifest

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    write_manifest(tmp_path / "m.json", stage="s", config={}, counts={}, started=time.time())
    threads = json.loads((tmp_path / "m.json").read_text())["threads"]
    assert threads["OMP_NUM_THREADS"] == "1" and threads["torch_threads"] == torch.get_num_threads()
    assert threads["cpus"] >= 1
