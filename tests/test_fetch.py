"""utils.fetch: the registry's pins and hashes, downloads from a local HTTP server, refusals, offline errors."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import socket
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from utils import fetch as F

# registry name -> the byte-exact reference copy (under the reference folder) whose sha256 the registry pins
REFERENCE_COPIES = {
    "mmhal-template": "data/rlaifv-original/eval/mmhal-bench_answer_template.json",
    "refomb-dev": "data/rlaifv-original/eval/RefoMB_dev.jsonl",
    "refomb-gpt4v": "data/rlaifv-original/eval/gpt4v_RefoMB_dev_0521.jsonl",
    "objhal-synonyms": "data/rlaifv-original/eval/synonyms_refine.txt",
    "chair-mapping": "data/rlaifv-original/eval/chair_mapping.mergeall.correct_0406.json",
    "prompt-objhal-extraction": "prompts/objhal_object_extraction.txt",
    "prompt-mmhal-judge": "prompts/mmhal_judge.txt",
    "prompt-refomb-pairwise": "prompts/refomb_pairwise_system.txt",
    "prompt-refomb-hallucination": "prompts/refomb_hallucination_system.txt",
    "prompt-split-facts": "prompts/split_facts.txt",
    "prompt-change-question": "prompts/change_question.txt",
}
CHECKPOINT_CONFIGS = {
    "liuhaotian/llava-v1.5-7b": "checkpoints/liuhaotian--llava-v1.5-7b/config.json",
    "llava-hf/llava-1.5-7b-hf": "checkpoints/llava-hf--llava-1.5-7b-hf/config.json",
    "openbmb/MiniCPM-Llama3-V-2_5": "checkpoints/openbmb--MiniCPM-Llama3-V-2_5/config.json",
}


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server(tmp_path, monkeypatch):
    """(folder it serves, base URL): a plain HTTP server on 127.0.0.1 standing in for raw.githubusercontent.com."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    root = tmp_path / "www"
    root.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _serve(root: Path, entry: F.Published, data: bytes) -> None:
    path = root / entry.repo / entry.commit / entry.path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(name: str, sha: str | None, extract: str | None = None, path: str = "data/x.txt") -> F.Published:
    return F.Published(name, "owner/repo", "a" * 40, path, f"{name}.txt", sha, "a test", extract=extract)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------------- registry


def test_registry_entries_are_well_formed():
    filenames = [e.filename for e in F.REGISTRY.values()]
    assert len(set(filenames)) == len(filenames)
    for name, e in F.REGISTRY.items():
        assert e.name == name
        assert e.url() == f"https://raw.githubusercontent.com/{e.repo}/{e.commit}/{e.path}"
        assert e.sha256 is None or (len(e.sha256) == 64 and int(e.sha256, 16) >= 0)
        assert (e.extract is not None) == name.startswith("prompt-") == e.filename.startswith("prompts/")
    # every entry is pinned to a commit with a hash, except the ones named here on purpose (see docs/DATA.md)
    assert {n for n, e in F.REGISTRY.items() if not (e.pinned and e.sha256)} == {"objhal-questions"}
    assert set(REFERENCE_COPIES) == {n for n, e in F.REGISTRY.items() if e.sha256}


def test_registered_hashes_are_those_of_the_reference_copies(reference_dir):
    for name, rel in REFERENCE_COPIES.items():
        assert _sha((reference_dir / rel).read_bytes()) == F.REGISTRY[name].sha256, name
    for repo_id, rel in CHECKPOINT_CONFIGS.items():
        assert _sha((reference_dir / rel).read_bytes()) == F.CHECKPOINTS[repo_id].config_sha256, repo_id
    assert {r for r, c in F.CHECKPOINTS.items() if c.config_sha256} == set(CHECKPOINT_CONFIGS)


def test_unknown_name_suggests_close_ones():
    with pytest.raises(KeyError, match="Did you mean refomb-dev"):
        F.lookup("refomb_dev")


# -------------------------------------------------------------------------------------------- downloads


def test_fetch_accepts_the_published_bytes_and_then_reuses_them(server, reference_dir, tmp_path):
    root, base = server
    for name in ("mmhal-template", "refomb-gpt4v", "objhal-synonyms"):
        _serve(root, F.REGISTRY[name], (reference_dir / REFERENCE_COPIES[name]).read_bytes())
    dest = tmp_path / "cache"
    for name in ("mmhal-template", "refomb-gpt4v", "objhal-synonyms"):
        got = F.fetch(name, dest, base_url=base)
        assert got.verified and got.path == dest / F.REGISTRY[name].filename
        assert got.path.read_bytes() == (reference_dir / REFERENCE_COPIES[name]).read_bytes()
        assert F.published_path(name, dest) == got.path
    # cached and verified: no download needed (the server no longer has the file)
    (root / F.RLHFV / F.REGISTRY["objhal-synonyms"].commit / "eval/data/synonyms_refine.txt").unlink()
    assert F.fetch("objhal-synonyms", dest, base_url=base).verified


def test_fetch_refuses_bytes_with_another_hash_and_writes_nothing(server, tmp_path):
    root, base = server
    entry = _entry("t-data", _sha(b"published\n"))
    _serve(root, entry, b"altered\n")
    dest = tmp_path / "cache"
    with pytest.raises(ValueError) as e:
        F.fetch(entry, dest, base_url=base)
    assert (
        _sha(b"altered\n") in str(e.value) and entry.sha256 in str(e.value) and "nothing was written" in str(e.value)
    )
    assert not (dest / entry.filename).exists()
    # a wrong file left in the cache is replaced by the published bytes once the source serves them
    (dest / entry.filename).parent.mkdir(parents=True, exist_ok=True)
    (dest / entry.filename).write_bytes(b"stale\n")
    _serve(root, entry, b"published\n")
    assert F.fetch(entry, dest, base_url=base).verified
    assert (dest / entry.filename).read_bytes() == b"published\n"


def test_fetch_without_a_pinned_hash_keeps_the_file_but_says_not_verified(server, tmp_path, caplog):
    root, base = server
    entry = _entry("t-unpinned", None)
    _serve(root, entry, b"anything\n")
    got = F.fetch(entry, tmp_path / "cache", base_url=base)
    assert not got.verified and got.sha256 == _sha(b"anything\n")
    assert f"sha256 {got.sha256} is NOT verified" in caplog.text


def test_offline_error_names_the_file_the_url_and_the_command(tmp_path):
    base = f"http://127.0.0.1:{_closed_port()}"
    start = time.monotonic()
    with pytest.raises(F.FetchError) as e:
        F.fetch("objhal-synonyms", tmp_path / "cache", base_url=base, timeout=5)
    msg = str(e.value)
    assert time.monotonic() - start < 5
    assert "'objhal-synonyms'" in msg and "`python -m utils.fetch objhal-synonyms`" in msg
    assert F.REGISTRY["objhal-synonyms"].url(base) in msg
    assert str(tmp_path / "cache" / "synonyms_refine.txt") in msg and "\n" not in msg


def test_http_error_is_named(server, tmp_path):
    _, base = server
    with pytest.raises(F.FetchError, match="HTTP 404"):
        F.fetch("refomb-dev", tmp_path, base_url=base)


def test_base_url_from_the_environment(server, tmp_path, monkeypatch):
    root, base = server
    entry = _entry("t-env", _sha(b"x"))
    _serve(root, entry, b"x")
    monkeypatch.setenv(F.BASE_URL_ENV, base)
    assert F.fetch(entry, tmp_path).verified


def test_published_path_names_the_file_and_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv(F.DATA_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError) as e:
        F.published_path("refomb-gpt4v")
    assert "gpt4v_RefoMB_dev_0521.jsonl" in str(e.value) and "`python -m utils.fetch refomb-gpt4v`" in str(e.value)
    (tmp_path / "gpt4v_RefoMB_dev_0521.jsonl").write_text("not the published file\n")
    with pytest.raises(ValueError, match="delete it and run `python -m utils.fetch refomb-gpt4v`"):
        F.published_path("refomb-gpt4v")


def test_resolve_file_takes_a_path_or_a_registry_name(tmp_path, monkeypatch):
    monkeypatch.setenv(F.DATA_ENV, str(tmp_path / "cache"))
    own = tmp_path / "mine.json"
    own.write_text("[]")
    assert F.resolve_file(str(own)) == own
    assert F.resolve_file("no/such/file.json") == Path("no/such/file.json")  # the caller's own error applies
    with pytest.raises(FileNotFoundError, match="`python -m utils.fetch mmhal-template`"):
        F.resolve_file("mmhal-template")
    F.atomic_write_bytes(tmp_path / "cache" / "prompts" / "x.txt", b"text")
    entry = _entry("t-named", _sha(b"text"))
    monkeypatch.setitem(F.REGISTRY, entry.name, dataclasses.replace(entry, filename="prompts/x.txt"))
    assert F.resolve_file("t-named") == tmp_path / "cache" / "prompts" / "x.txt"


def test_atomic_write_leaves_the_old_file_whole_when_the_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "f.json"
    F.atomic_write_bytes(target, b"old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(F.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        F.atomic_write_bytes(target, b"new bytes")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.json"]


# ------------------------------------------------------------------------------------------------- prompts

# A script shaped like the published ones (module-level literals, a prompt built in a function with `+` and a
# loop). Expected texts below are written out by hand from it.
SCRIPT = '''
import json

TEMPLATE = """Judge this.\\nSay \\"[[A]]\\" or {}.
"""
SYSTEM_MSG = \'\'\'
Line one.\\n\\nLine two.
\'\'\'


def build_pair(item):
    question = item["q"]
    TEMPLATE = "shadowed, not module level"
    content = "Facts of:\\nQuestion: " + question + "\\nAnswer: " + item_answer
    short = " ".join(content.split(" ")[:300])
    return short


def build_list(item):
    facts = item["facts"]
    content = "Rewrite:\\n### Sentences:"
    for fact in facts:
        content += "\\n- {}\\n".format(fact)
    return content
'''


def test_extract_module_level_literal():
    assert F.extract_prompt(SCRIPT, "assign:TEMPLATE") == 'Judge this.\nSay "[[A]]" or {}.\n'
    assert F.extract_prompt(SCRIPT, "assign:SYSTEM_MSG") == "\nLine one.\n\nLine two.\n"


def test_extract_text_built_in_a_function():
    """`+` of literals and names gives {name} slots; a format loop gives the descriptive slot of the released
    change-question prompt: '{facts, each as "\\n- {fact}\\n"}' with the newlines written as backslash-n."""
    assert F.extract_prompt(SCRIPT, "build:build_pair:content") == (
        "Facts of:\nQuestion: {question}\nAnswer: {item_answer}"
    )
    assert F.extract_prompt(SCRIPT, "build:build_list:content") == (
        "Rewrite:\n### Sentences:" + '{facts, each as "' + "\\n- {fact}\\n" + '"}'
    )


@pytest.mark.parametrize(
    "script, spec, match",
    [
        (SCRIPT, "assign:MISSING", "no module-level assignment to 'MISSING'"),
        ("P = f'{x} y'\n", "assign:P", "JoinedStr, not a string literal"),
        (SCRIPT, "build:nope:content", "no function 'nope'"),
        ("def f(x):\n    c = 'a'\n    c = 'b'\n", "build:f:c", "assigned twice"),
        ("def f(x):\n    c = 'a' + x.upper()\n", "build:f:c", "unsupported expression Call"),
        ("def f(xs):\n    c = 'a'\n    for x in xs:\n        c += x\n", "build:f:c", "unsupported loop"),
        ("def f(x):\n    c = 'a'\n    c += x\n", "build:f:c", "unsupported statement at line 3"),
        (SCRIPT, "regex:.*", "unknown extraction"),
    ],
)
def test_extract_refuses_other_shapes(script, spec, match):
    with pytest.raises(ValueError, match=match):
        F.extract_prompt(script, spec)


def test_prompt_fetch_extracts_verifies_and_keeps_the_script(server, tmp_path):
    root, base = server
    expected = "\nLine one.\n\nLine two.\n"
    entry = _entry("t-prompt", _sha(expected.encode()), extract="assign:SYSTEM_MSG", path="eval/judge.py")
    _serve(root, entry, SCRIPT.encode())
    dest = tmp_path / "cache"
    got = F.fetch(entry, dest, base_url=base)
    assert got.verified and got.path.read_text() == expected
    assert entry.source_cache(dest).read_bytes() == SCRIPT.encode()
    # offline, a script kept (or put there by hand) is enough to rebuild the prompt
    got.path.unlink()
    assert F.fetch(entry, dest, base_url=f"http://127.0.0.1:{_closed_port()}").path.read_text() == expected
    wrong = _entry("t-prompt2", _sha(b"other"), extract="assign:SYSTEM_MSG", path="eval/judge.py")
    with pytest.raises(ValueError, match="the prompt extracted"):
        F.fetch(wrong, dest, base_url=base)
    assert not (dest / wrong.filename).exists()


@pytest.mark.parametrize("name", [n for n, e in F.REGISTRY.items() if e.extract])
def test_cached_published_script_gives_the_reference_prompt(name, reference_dir):
    """Runs where `python -m utils.fetch NAME` has put the published script in the cache; skips elsewhere."""
    entry = F.REGISTRY[name]
    script = entry.source_cache(F.published_dir())
    if not script.is_file():
        pytest.skip(f"{script} not fetched (run `python -m utils.fetch {name}`)")
    text = F.extract_prompt(script.read_text(encoding="utf-8"), entry.extract)
    assert text == (reference_dir / REFERENCE_COPIES[name]).read_text(encoding="utf-8")


# --------------------------------------------------------------------------------------------- checkpoints


def _hub_cache(tmp_path: Path, repo_id: str, config: bytes) -> Path:
    """A local hub cache holding only config.json of ``repo_id`` at main (the layout snapshot_download reads)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "config.json").write_bytes(config)
    return snap


def test_checkpoint_from_the_local_hub_cache_is_verified(reference_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    published = (reference_dir / CHECKPOINT_CONFIGS["liuhaotian/llava-v1.5-7b"]).read_bytes()
    snap = _hub_cache(tmp_path, "liuhaotian/llava-v1.5-7b", published)
    path, ok = F.fetch_checkpoint("liuhaotian/llava-v1.5-7b", cache_dir=tmp_path / "hub")
    assert path == snap and ok
    (snap / "config.json").write_bytes(published.replace(b'"pad"', b'"square"'))
    with pytest.raises(ValueError, match="the hub repo changed since it was pinned; pass --revision"):
        F.fetch_checkpoint("liuhaotian/llava-v1.5-7b", cache_dir=tmp_path / "hub")
    assert F.fetch_checkpoint("liuhaotian/llava-v1.5-7b", cache_dir=tmp_path / "hub", unverified=True) == (snap, False)


def test_checkpoint_without_a_pinned_hash_is_not_verified(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _hub_cache(tmp_path, "openbmb/RLAIF-V-7B", b"{}\n")
    assert F.fetch_checkpoint("openbmb/RLAIF-V-7B", cache_dir=tmp_path / "hub")[1] is False


def test_checkpoint_offline_miss_is_one_line_naming_the_command(tmp_path, monkeypatch):
    """Hub unreachable (a closed local port as the endpoint): no retries, one line naming the fetch command."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    start = time.monotonic()
    with pytest.raises(F.FetchError) as e:
        F.fetch_checkpoint("openbmb/MiniCPM-Llama3-V-2_5", cache_dir=tmp_path / "empty")
    msg = str(e.value)
    assert time.monotonic() - start < 10 and "\n" not in msg
    assert "`python -m utils.fetch --checkpoint openbmb/MiniCPM-Llama3-V-2_5`" in msg
    assert "--revision 45208262c29c515bce122bfea79daacfdc73960a" in msg


# ---------------------------------------------------------------------------------------------------- CLI


def test_cli_list_fetch_and_errors(server, tmp_path, monkeypatch, capsys):
    root, base = server
    good, unpinned = _entry("t-good", _sha(b"ok\n")), _entry("t-free", None, path="data/y.txt")
    monkeypatch.setitem(F.REGISTRY, good.name, good)
    monkeypatch.setitem(F.REGISTRY, unpinned.name, unpinned)
    _serve(root, good, b"ok\n")
    _serve(root, unpinned, b"free\n")
    monkeypatch.setenv(F.BASE_URL_ENV, base)

    assert F.main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in F.REGISTRY) and "liuhaotian/llava-v1.5-7b" in listed

    assert F.main(["t-good", "t-free", "--dest", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert f"t-good: {tmp_path / 'd' / 't-good.txt'} (sha256 verified)" in out
    free_sha = _sha(b"free\n")
    assert f"t-free: {tmp_path / 'd' / 't-free.txt'} (sha256 {free_sha} NOT verified)" in out

    assert F.main(["t-gud", "--dest", str(tmp_path / "d")]) == 1
    assert "unknown published file 't-gud'. Did you mean t-good?" in capsys.readouterr().err


def test_score_clis_take_a_registry_name_for_a_published_file(tmp_path, monkeypatch, capsys):
    """`--template mmhal-template` resolves to the cached, verified copy; not fetched yet, the usage error names the
    fetch command (before anything runs)."""
    from eval.mmhal import make_parser

    monkeypatch.setenv(F.DATA_ENV, str(tmp_path / "cache"))
    with pytest.raises(SystemExit):
        make_parser().parse_args(["--answers", "a.jsonl", "--template", "mmhal-template", "--out-dir", "o"])
    assert "`python -m utils.fetch mmhal-template`" in capsys.readouterr().err
    F.atomic_write_bytes(tmp_path / "cache" / "prompts" / "x.txt", b"text")
    entry = _entry("t-named", _sha(b"text"))
    monkeypatch.setitem(F.REGISTRY, entry.name, dataclasses.replace(entry, filename="prompts/x.txt"))
    args = make_parser().parse_args(
        ["--answers", "a.jsonl", "--template", "t-named", "--prompt-file", "t-named", "--out-dir", "o"]
    )
    assert args.template == args.prompt_file == str(tmp_path / "cache" / "prompts" / "x.txt")
