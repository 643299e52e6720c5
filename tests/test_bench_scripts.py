"""script/bench/compare_commits.sh: the same command in two commits' trees, run one after the other."""

from __future__ import annotations

import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "script" / "bench" / "compare_commits.sh"


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def test_compare_commits_runs_the_command_in_each_commits_tree(tmp_path: Path) -> None:
    """Two commits of a scratch repo differ in v.txt: the command sees each commit's file in order (A, B, A again
    with REPEAT=1), never the working tree's uncommitted edit or untracked file; a bad revision stops with exit 2."""
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    _git(repo, "config", "user.email", "t@t")
    _git(repo, "config", "user.name", "t")
    shas = []
    for v in ("one", "two"):
        (repo / "v.txt").write_text(v + "\n")
        _git(repo, "add", "v.txt")
        _git(repo, "commit", "-qm", v)
        shas.append(_git(repo, "rev-parse", "HEAD"))
    (repo / "v.txt").write_text("dirty\n")
    (repo / "untracked.txt").write_text("x\n")
    cmd = ["bash", str(SCRIPT), "--out", str(tmp_path / "o"), "HEAD~1", "HEAD", "--", "sh", "-c",
           "cat v.txt; ls untracked.txt 2>/dev/null || echo no-untracked"]  # fmt: skip
    res = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, env={"REPEAT": "1", "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr
    lines = [line for line in res.stdout.splitlines() if not line.startswith("=== logs")]
    headers = [line.split()[1] for line in lines if line.startswith("=== ")]
    bodies = [line for line in lines if not line.startswith("=== ")]
    assert headers == ["HEAD~1", "HEAD", "HEAD~1"]
    assert bodies == ["one", "no-untracked", "two", "no-untracked", "one", "no-untracked"]
    assert (tmp_path / "o" / f"{shas[1]}.run2.log").read_text().splitlines()[0] == "two"

    bad = subprocess.run(
        ["bash", str(SCRIPT), "HEAD", "nope", "--", "echo", "ran"], cwd=repo, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "'nope' is not a commit" in bad.stderr and "ran" not in bad.stdout
    usage = subprocess.run(["bash", str(SCRIPT), "HEAD", "HEAD", "true"], cwd=repo, capture_output=True, text=True)
    assert usage.returncode == 2 and usage.stderr.startswith("usage:")
