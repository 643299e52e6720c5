"""Fetch published files (benchmark items, judge prompts, checkpoints) from their public source, pinned and hash-checked.

python -m utils.fetch --list
python -m utils.fetch mmhal-template prompt-mmhal-judge [--dest DIR]
python -m utils.fetch --checkpoint liuhaotian/llava-v1.5-7b [--dest DIR]
"""

from __future__ import annotations

import argparse
import ast
import difflib
import hashlib
import logging
import os
import socket
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from utils.io import atomic_write_bytes

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://raw.githubusercontent.com"
BASE_URL_ENV = "RLAIFV_FETCH_BASE_URL"  # a mirror laid out as <base>/<owner>/<repo>/<commit>/<path> (tests: 127.0.0.1)
DATA_ENV = "RLAIFV_DATA"

RLAIFV = "RLHF-V/RLAIF-V"
RLHFV = "RLHF-V/RLHF-V"  # the codebase RLAIF-V builds on; its eval/data holds the files RLAIF-V's eval reads


class FetchError(OSError):
    """A published file could not be obtained (offline, HTTP error); the message says what to do instead."""


@dataclass(frozen=True)
class Published:
    """One published file: where it comes from, where it is cached, and the sha256 of the bytes we keep.

    ``extract`` names a prompt inside a published Python script (see :func:`extract_prompt`); then ``sha256`` is
    that of the extracted text, which is what the evaluators read. ``sha256`` None: no hash could be established;
    the file is kept but reported as NOT verified.
    """

    name: str
    repo: str
    commit: str
    path: str
    filename: str
    sha256: str | None
    used_by: str
    extract: str | None = None

    @property
    def pinned(self) -> bool:
        return len(self.commit) == 40 and all(c in "0123456789abcdef" for c in self.commit)

    def url(self, base_url: str | None = None) -> str:
        base = (base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL).rstrip("/")
        return f"{base}/{self.repo}/{self.commit}/{self.path}"

    def source_cache(self, dest: Path) -> Path:
        """Where the fetched script of a prompt entry is kept (and where to put it by hand)."""
        return dest / "sources" / self.repo / self.commit / self.path


# How each hash was obtained. Data files: the search tool's stored copy of the public file at that commit has the
# same character count and the same text where read (start and end; synonyms in full) as the byte-exact copy the
# test suite reads through RLAIFV_REFERENCE (its data/rlaifv-original/eval); the sha256 is that of that copy.
# Prompts: the sha256 is that of the reference prompt file (RLAIFV_REFERENCE's prompts/). extract_prompt run on the
# search tool's text of the script at that commit gave exactly those bytes (objhal, RefoMB hallucination, split,
# change-question); the MMHal and RefoMB pairwise literals were compared by reading. The scripts' own bytes are not
# pinned (we could read their text, not their bytes): the extracted prompt, what the evaluators read, is.
REGISTRY: dict[str, Published] = {
    p.name: p
    for p in [
        Published(
            "mmhal-template", RLHFV, "3d35a91568b237fcc9d884463d9279fd7ae10350",
            "eval/data/mmhal-bench_answer_template.json", "mmhal-bench_answer_template.json",
            "28ed24e19ffef292597c35f1dad37760b2e0a088b3b40ca3b50f105fc1b951bb",
            "MMHal-Bench's 96 items: eval.answer --benchmark mmhal --questions, eval.mmhal --template",
        ),  # 50519 chars both, same end; RLAIF-V's README links a Drive copy of the same file
        Published(
            "refomb-dev", RLAIFV, "59e9254d4b7fe68bdc87923279f8773ed0b5a49c",
            "eval/data/RefoMB_dev.jsonl", "RefoMB_dev.jsonl",
            "19917494814211a40d683e519ebe87ad2d3d717bc4e051127f944b98d24a2f67",
            "RefoMB dev questions (99): eval.answer --benchmark refomb --questions",
        ),  # 445719 chars both, same end
        Published(
            "refomb-gpt4v", RLAIFV, "59e9254d4b7fe68bdc87923279f8773ed0b5a49c",
            "eval/data/gpt4v_RefoMB_dev_0521.jsonl", "gpt4v_RefoMB_dev_0521.jsonl",
            "f3efb866a4154c284446943d90b93659b936e52e49f1d39cb8ccc45b29496ac6",
            "RefoMB items with GPT-4V's reference answers: eval.refomb overall --reference",
        ),  # 544107 chars both, same end
        Published(
            "objhal-synonyms", RLHFV, "3d35a91568b237fcc9d884463d9279fd7ae10350",
            "eval/data/synonyms_refine.txt", "synonyms_refine.txt",
            "681041d2958d7871ed6fa69c3108f34aa6a0a354eb53ed4c5a425e65f86bc72a",
            "Object HalBench's COCO synonym table (80 lines): eval.objhal --synonyms",
        ),  # 3594 chars both, whole text read
        Published(
            "chair-mapping", RLAIFV, "8da5b48022016d7139e97fccedd61ad330ff1500",
            "eval/data/chair_mapping.mergeall.correct_0406.json", "chair_mapping.mergeall.correct_0406.json",
            "c10875acaa01afa91a3cde975183308053eb03458bb87b23a1c1c0b189bf7a97",
            "class -> open-vocabulary forms (published, unused by the published numbers)",
        ),  # 20930 chars both, same end
        Published(
            "objhal-questions", RLAIFV, "main",
            "eval/data/obj_halbench_300_with_image.jsonl", "obj_halbench_300_with_image.jsonl",
            None,  # not in the search tool's index (too large?): linked on main by third parties; no commit, no hash
            "Object HalBench's 300 questions with images: eval.answer --benchmark objhal --questions",
        ),
        Published(
            "prompt-objhal-extraction", RLAIFV, "8fafcb24bf594ba964708a2752ba6f16f8797f8f",
            "eval/eval_gpt_obj_halbench.py", "prompts/objhal_object_extraction.txt",
            "9d732f9b73a3cc965bee6eb163b8e5248e58bd9d382eb583e9ece59933e2b580",
            "Object HalBench judge (object extraction): eval.objhal --prompt-file",
            extract="assign:prompt_template",
        ),
        Published(
            "prompt-mmhal-judge", RLAIFV, "8fafcb24bf594ba964708a2752ba6f16f8797f8f",
            "eval/eval_gpt_mmhal.py", "prompts/mmhal_judge.txt",
            "2c73d8c50f1740d000fae62cfeed103c2f7a5bcfa904b27e6e09900e7ce600cc",
            "MMHal-Bench judge: eval.mmhal --prompt-file",
            extract="assign:template",
        ),
        Published(
            "prompt-refomb-pairwise", RLAIFV, "3473ab15101d3ab726bf1845d1028821a54e9b37",
            "eval/eval_RefoMB_p0.py", "prompts/refomb_pairwise_system.txt",
            "486e38356155ad90716dc7c0360e5e767ac65836dcaa19c86c214a9a63034623",
            "RefoMB pairwise judge: eval.refomb overall --prompt-file",
            extract="assign:SYSTEM_MSG",
        ),
        Published(
            "prompt-refomb-hallucination", RLAIFV, "3473ab15101d3ab726bf1845d1028821a54e9b37",
            "eval/eval_hallucination.py", "prompts/refomb_hallucination_system.txt",
            "48b93b1e0d6165d5ea08eb29300c761a47f16856e9b42dfbb347b17f5128f14e",
            "RefoMB hallucination pass: eval.refomb hall --prompt-file",
            extract="assign:SYSTEM_MSG",
        ),
        Published(
            "prompt-split-facts", RLAIFV, "d8d70ca1bf9a81b62e083381c6f89dc9c37054d0",
            "utils/llama3_8b_inference.py", "prompts/split_facts.txt",
            "12d9f6f18802e3060878b83e29c1a117c90b6b815fbc1c7425d58d65aa177eee",
            "the released split model's prompt: muffin.feedback.divide --prompt-file (with --max-prompt-words 300)",
            extract="build:wrap_prompt_divide_to_list:content",
        ),
        Published(
            "prompt-change-question", RLAIFV, "d8d70ca1bf9a81b62e083381c6f89dc9c37054d0",
            "utils/llama3_8b_inference.py", "prompts/change_question.txt",
            "b2c21d31f05b5f7929d7940a81a385a0d65d6a9a7e0f60b4d4bb0d63266737c7",
            "the released change-question model's prompt: muffin.feedback.changeq --prompt-file",
            extract="build:wrap_prompt_changeq_to_list:content",
        ),
    ]
}  # fmt: skip


# ----------------------------------------------------------------------------------------------- prompt extraction


def extract_prompt(source: str, spec: str) -> str:
    """The prompt text that ``spec`` names inside the Python ``source`` of a published script.

    ``assign:NAME``: the string literal of the module-level ``NAME = "..."``. ``build:FUNC:VAR``: the text that
    function ``FUNC`` builds in ``VAR``: string literals as they are, a variable ``x`` added with ``+`` as ``{x}``,
    and a loop ``for f in fs: VAR += "<fmt>".format(f)`` as ``{fs, each as "<fmt with {f}>"}`` (newlines shown as
    ``\\n``), the slot convention our fillers read. Anything else raises ValueError, so a changed upstream script
    fails loudly instead of yielding a different prompt.
    """
    tree = ast.parse(source)
    kind, _, rest = spec.partition(":")
    if kind == "assign":
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == rest for t in node.targets):
                if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                    return node.value.value
                raise ValueError(f"'{rest}' is assigned a {type(node.value).__name__}, not a string literal")
        raise ValueError(f"no module-level assignment to '{rest}'")
    if kind == "build":
        func, _, var = rest.partition(":")
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name == func:
                return _built_text(node, var)
        raise ValueError(f"no function '{func}'")
    raise ValueError(f"unknown extraction '{spec}'; use assign:NAME or build:FUNC:VAR")


def _built_text(func: ast.FunctionDef, var: str) -> str:
    parts: list[str] | None = None
    for stmt in func.body:
        if isinstance(stmt, ast.Assign) and _is_name(stmt.targets[0], var):
            if parts is not None:
                raise ValueError(f"'{var}' is assigned twice in '{func.name}'")
            parts = _concat(stmt.value)
        elif isinstance(stmt, ast.For) and any(_is_name(n, var) for n in ast.walk(stmt) if isinstance(n, ast.Name)):
            if parts is None:
                raise ValueError(f"'{var}' is extended in a loop before it is assigned in '{func.name}'")
            parts.append(_loop_slot(stmt, var))
        elif any(isinstance(n, ast.Name) and n.id == var and isinstance(n.ctx, ast.Store) for n in ast.walk(stmt)):
            raise ValueError(f"'{var}' is changed by an unsupported statement at line {stmt.lineno}")
    if parts is None:
        raise ValueError(f"'{func.name}' never assigns '{var}'")
    return "".join(parts)


def _is_name(node: ast.AST, name: str) -> bool:
    return isinstance(node, ast.Name) and node.id == name


def _concat(node: ast.expr) -> list[str]:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _concat(node.left) + _concat(node.right)
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.Name):
        return ["{" + node.id + "}"]
    raise ValueError(f"unsupported expression {type(node).__name__} at line {node.lineno}")


def _loop_slot(loop: ast.For, var: str) -> str:
    body = loop.body[0] if len(loop.body) == 1 else None
    call = body.value if isinstance(body, ast.AugAssign) and _is_name(body.target, var) else None
    if not (
        isinstance(loop.target, ast.Name)
        and isinstance(loop.iter, ast.Name)
        and isinstance(body.op if body else None, ast.Add)
        and isinstance(call, ast.Call)
        and isinstance(call.func, ast.Attribute)
        and call.func.attr == "format"
        and isinstance(call.func.value, ast.Constant)
        and isinstance(call.func.value.value, str)
        and [a.id for a in call.args if isinstance(a, ast.Name)] == [loop.target.id]
        and len(call.args) == 1
    ):
        raise ValueError(f'unsupported loop at line {loop.lineno}: expected `for x in xs: {var} += "...".format(x)`')
    fmt = call.func.value.value.replace("{}", "{" + loop.target.id + "}")
    shown = fmt.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace('"', '\\"')
    return "{" + f'{loop.iter.id}, each as "{shown}"' + "}"


# ----------------------------------------------------------------------------------------------------- files


def published_dir(dest: str | Path | None = None) -> Path:
    """The cache folder: ``dest``, else ``$RLAIFV_DATA``, else ``~/.cache/rlaifv/published``."""
    if dest is not None:
        return Path(dest).expanduser()
    return Path(os.environ.get(DATA_ENV) or Path.home() / ".cache" / "rlaifv" / "published").expanduser()


def lookup(name: str) -> Published:
    """The registry entry ``name``; an unknown name lists the close matches and every known one."""
    if name in REGISTRY:
        return REGISTRY[name]
    close = difflib.get_close_matches(name, REGISTRY, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise KeyError(f"unknown published file '{name}'.{hint} Available: {', '.join(REGISTRY)}")


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def published_path(name: str, dest: str | Path | None = None) -> Path:
    """The cached file ``name``, checked against its pinned sha256.

    Raises FileNotFoundError naming the file and the command that fetches it, ValueError when the cached bytes
    are not the published ones.
    """
    entry = lookup(name)
    path = published_dir(dest) / entry.filename
    if not path.is_file():
        raise FileNotFoundError(
            f"published file '{name}' ({entry.filename}) is not in {path.parent}; fetch it with "
            f"`python -m utils.fetch {name}` (needs internet; see docs/DATA.md), or pass the file's path directly"
        )
    got = sha256_of(path.read_bytes())
    if entry.sha256 is None:
        logger.warning("%s: sha256 %s is NOT verified (no published hash is pinned)", name, got)
    elif got != entry.sha256:
        raise ValueError(
            f"{path} has sha256 {got}, not the published {entry.sha256}; delete it and run "
            f"`python -m utils.fetch {name}`"
        )
    return path


def resolve_file(value: str | Path) -> Path:
    """``value`` as a path when it exists or is no registry name, else the registry file's cached, verified path.

    Lets a CLI flag such as ``--template`` take either a file or a name (``mmhal-template``); a name not fetched
    yet raises the FileNotFoundError of :func:`published_path`.
    """
    path = Path(value).expanduser()
    if path.exists() or str(value) not in REGISTRY:
        return path
    return published_path(str(value))


def file_or_name(value: str) -> str:
    """argparse ``type`` of a file flag that also takes a registry name (``--template mmhal-template``): the path, or
    a usage error naming the fetch command when the name is not fetched yet."""
    import argparse

    try:
        return str(resolve_file(value))
    except FileNotFoundError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


@dataclass(frozen=True)
class Fetched:
    name: str
    path: Path
    sha256: str
    verified: bool


def fetch(
    name: str | Published, dest: str | Path | None = None, base_url: str | None = None, timeout: float = 30.0
) -> Fetched:
    """Download ``name`` (or reuse the verified cached copy) and keep it at ``<dest>/<filename>``.

    Nothing is written unless the bytes have the pinned sha256; an entry without a hash is kept and reported as
    NOT verified. Prompt entries download the script, extract the prompt and check the prompt's hash; a script put
    by hand at :meth:`Published.source_cache` is used without downloading.
    """
    entry = name if isinstance(name, Published) else lookup(name)
    root = published_dir(dest)
    target = root / entry.filename
    if target.is_file() and entry.sha256 is not None and sha256_of(target.read_bytes()) == entry.sha256:
        return Fetched(entry.name, target, entry.sha256, True)
    script = entry.source_cache(root) if entry.extract else target
    url = entry.url(base_url)
    if entry.extract and script.is_file():
        raw = script.read_bytes()
    else:
        raw = _download(entry, url, script, timeout)
    if entry.extract:
        data = extract_prompt(raw.decode("utf-8"), entry.extract).encode("utf-8")
    else:
        data = raw
    got = sha256_of(data)
    if entry.sha256 is not None and got != entry.sha256:
        what = f"the prompt extracted ({entry.extract}) from {url}" if entry.extract else url
        raise ValueError(
            f"'{entry.name}': {what} has sha256 {got}, not the pinned {entry.sha256}; nothing was written. "
            "The source changed or the download was altered: check the URL by hand before trusting it"
        )
    if entry.extract:
        atomic_write_bytes(script, raw)
    atomic_write_bytes(target, data)
    if entry.sha256 is None:
        logger.warning("%s: sha256 %s is NOT verified (no published hash is pinned)", entry.name, got)
    return Fetched(entry.name, target, got, entry.sha256 is not None)


def _download(entry: Published, url: str, put_at: Path, timeout: float) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 (https or a test's 127.0.0.1)
            return r.read()
    except (urllib.error.URLError, OSError) as e:
        reason = f"HTTP {e.code}" if isinstance(e, urllib.error.HTTPError) else str(getattr(e, "reason", e))
        raise FetchError(
            f"cannot download '{entry.name}' from {url} ({reason}); run `python -m utils.fetch {entry.name}` "
            f"where the internet is reachable, or download that URL by hand and put it at {put_at}"
        ) from e


# ------------------------------------------------------------------------------------------------ checkpoints


@dataclass(frozen=True)
class PublishedCheckpoint:
    """A hub checkpoint: the revision to download (None: the hub's main) and the sha256 of its config.json."""

    repo_id: str
    revision: str | None
    config_sha256: str | None
    note: str


# config.json hashes are those of byte-exact copies of the hub files (RLAIFV_REFERENCE's checkpoints/*/SOURCES.md):
# a committed snapshot_download (liuhaotian), a whole-snapshot upload (llava-hf), a git mirror of the hub repo at
# the pinned revision (MiniCPM). Reconstructed or missing configs get no hash: a download is reported NOT verified.
CHECKPOINTS: dict[str, PublishedCheckpoint] = {
    c.repo_id: c
    for c in [
        PublishedCheckpoint("liuhaotian/llava-v1.5-7b", None,
                            "f112de882e31171a105f0d3f69d9e6e8700a40149f0944f4b507d3a41789e492",
                            "LLaVA 1.5 7B (original format); its CLIP tower is openai/clip-vit-large-patch14-336"),
        PublishedCheckpoint("llava-hf/llava-1.5-7b-hf", None,
                            "ad20ffe188ce77e1d7a9dee8742740164510ec3605391943e59c83079c8e4a75",
                            "LLaVA 1.5 7B (transformers format), the 2025 state of the hub repo"),
        PublishedCheckpoint("openbmb/MiniCPM-Llama3-V-2_5", "45208262c29c515bce122bfea79daacfdc73960a",
                            "f1504a766a8fa69553d5d19e8ebd1d3c3c855221c776f3b3fb869ce403c157ed",
                            "labeler of the published llava15 + MiniCPM-V data pipeline (remote code)"),
        PublishedCheckpoint("openbmb/RLAIF-V-7B", None, None, "RLAIF-V 7B; no copy of its config.json was found"),
        PublishedCheckpoint("openbmb/RLAIF-V-12B", None, None, "RLAIF-V 12B; config.json only reconstructed"),
        PublishedCheckpoint("openbmb/OmniLMM-12B", "3efec515b32d4a59461c7eff50ba67692dd5311b", None,
                            "OmniLMM 12B; config.json only reconstructed (from the page at this revision)"),
        PublishedCheckpoint("openai/clip-vit-large-patch14-336", None, None, "the vision tower of LLaVA 1.5"),
        PublishedCheckpoint("llava-hf/llava-v1.6-mistral-7b-hf", None, None, "LLaVA-NeXT; config reconstructed"),
        PublishedCheckpoint("Qwen/Qwen2.5-VL-7B-Instruct", None, None, "config.json seen only as a ModelScope copy"),
    ]
}  # fmt: skip

METADATA_PATTERNS = ["*.json", "*.model", "*.txt", "*.py", "*.jinja", "*.md"]


def fetch_checkpoint(
    repo_id: str,
    dest: str | Path | None = None,
    revision: str | None = None,
    unverified: bool = False,
    metadata_only: bool = False,
    cache_dir: str | Path | None = None,
) -> tuple[Path, bool]:
    """(snapshot folder, config.json verified) of ``repo_id`` at its pinned revision, through ``snapshot_download``.

    Offline (``HF_HUB_OFFLINE=1`` or the hub unreachable within seconds) only the local hub cache is used, and a
    miss is one FetchError line. A config.json that differs from the pinned hash raises ValueError unless
    ``unverified``; a checkpoint without a pinned hash is returned as not verified.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    entry = CHECKPOINTS.get(repo_id, PublishedCheckpoint(repo_id, None, None, "not in the registry"))
    revision = revision or entry.revision
    forced = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
    offline = forced or not hub_reachable()
    rev_flag = f" --revision {revision}" if revision else ""
    try:
        path = Path(
            snapshot_download(
                repo_id,
                revision=revision,
                local_dir=dest,
                cache_dir=cache_dir,
                local_files_only=offline,
                allow_patterns=METADATA_PATTERNS if metadata_only else None,
                etag_timeout=10,
            )
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
        why = "HF_HUB_OFFLINE is set" if forced else "the hub is not reachable"
        first_line = (str(e).splitlines() or [""])[0]
        where = f"{why} and it is not in the local hub cache" if offline else f"{type(e).__name__}: {first_line}"
        raise FetchError(
            f"cannot get checkpoint '{repo_id}' ({where}); run `python -m utils.fetch --checkpoint {repo_id}` where "
            f"huggingface.co is reachable (or `huggingface-cli download {repo_id}{rev_flag} --local-dir DIR` and "
            "pass DIR as --model-path)"
        ) from e
    return path, _check_config(entry, path, revision, unverified)


def _check_config(entry: PublishedCheckpoint, path: Path, revision: str | None, unverified: bool) -> bool:
    config = path / "config.json"
    if entry.config_sha256 is None or not config.is_file():
        logger.warning("%s: config.json NOT verified (no published hash is pinned)", entry.repo_id)
        return False
    got = sha256_of(config.read_bytes())
    if got == entry.config_sha256:
        return True
    msg = (
        f"{config} of '{entry.repo_id}' (revision {revision or 'main'}) has sha256 {got}, not the published "
        f"{entry.config_sha256}: the hub repo changed since it was pinned"
    )
    if not unverified:
        raise ValueError(msg + "; pass --revision of the published state, or --unverified to accept it knowingly")
    logger.warning("%s; accepted because --unverified was given", msg)
    return False


def hub_reachable(timeout: float = 3.0) -> bool:
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout).close()
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------------- CLI


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m utils.fetch",
        description="Fetch published files (benchmark items, judge prompts) from their public source at a pinned "
        "commit, or a hub checkpoint at a pinned revision, and check their sha256. See docs/DATA.md.",
    )
    p.add_argument("names", nargs="*", help="registry names (see --list); 'all' fetches every one")
    p.add_argument("--list", action="store_true", help="list the registry: name, source, pin, what uses it")
    p.add_argument("--dest", default=None, help=f"folder to keep the files in (default ${DATA_ENV} or ~/.cache/...)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per download before giving up")
    p.add_argument("--checkpoint", default=None, help="hub repo id to download through huggingface_hub")
    p.add_argument("--revision", default=None, help="with --checkpoint: a revision other than the pinned one")
    p.add_argument("--metadata-only", action="store_true", help="with --checkpoint: configs/tokenizer, no weights")
    p.add_argument(
        "--unverified", action="store_true", help="with --checkpoint: keep a config.json that differs from the pin"
    )
    return p


def _list() -> None:
    for e in REGISTRY.values():
        pin = e.commit[:10] if e.pinned else f"{e.commit} (NOT pinned)"
        sha = e.sha256[:12] if e.sha256 else "unknown"
        print(f"{e.name:30s} {e.repo}@{pin}:{e.path} sha256 {sha}\n{'':30s} {e.used_by}")
    print("\ncheckpoints (--checkpoint REPO_ID):")
    for c in CHECKPOINTS.values():
        sha = "config.json sha256 " + (c.config_sha256[:12] if c.config_sha256 else "unknown")
        print(f"{c.repo_id:40s} revision {c.revision or 'main'}; {sha}; {c.note}")


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.list or not (args.names or args.checkpoint):
        _list()
        return 0
    failed = 0
    if args.checkpoint:
        try:
            path, ok = fetch_checkpoint(args.checkpoint, args.dest, args.revision, args.unverified, args.metadata_only)
            print(f"{args.checkpoint}: {path} (config.json {'verified' if ok else 'NOT verified'})")
        except (FetchError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
    names = list(REGISTRY) if args.names == ["all"] else args.names
    for name in names:
        try:
            f = fetch(name, args.dest, timeout=args.timeout)
            state = "sha256 verified" if f.verified else f"sha256 {f.sha256} NOT verified"
            print(f"{name}: {f.path} ({state})")
        except (FetchError, ValueError, KeyError) as e:
            print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
