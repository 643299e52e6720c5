"""Shared fixtures: offline hub, gpu/slow markers, the read-only reference folder, tiny checkpoints, test pairs."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
# the weights-hash memo (muffin.train.reference_cache) of this test session, not the user's ~/.cache
os.environ.setdefault(
    "RLAIFV_HASH_MEMO", os.path.join(tempfile.gettempdir(), f"rlaifv-tests-{os.getpid()}", "weights_sha256.json")
)

REPO = Path(__file__).resolve().parent.parent
REFERENCE = Path(os.environ.get("RLAIFV_REFERENCE", REPO.parent / "shared" / "reference"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-gpu", action="store_true", help="run tests marked gpu")
    parser.addoption("--run-slow", action="store_true", help="run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "gpu" in item.keywords and not config.getoption("--run-gpu"):
            item.add_marker(pytest.mark.skip(reason="gpu test: pass --run-gpu on a machine with a GPU"))
        if "slow" in item.keywords and not config.getoption("--run-slow"):
            item.add_marker(pytest.mark.skip(reason="slow test: pass --run-slow"))


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The read-only published-system reference folder (../shared/reference); skips when absent."""
    if not REFERENCE.is_dir():
        pytest.skip(f"reference folder {REFERENCE} not present")
    return REFERENCE


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random llava-hf checkpoint directory, built once per session."""
    from utils.tiny_models import build_tiny

    return build_tiny("llava", tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="session")
def tiny_llava_original(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same kind of model in the original LLaVA (llava_llama) on-disk format."""
    from utils.tiny_models import build_tiny

    return build_tiny("llava_original", tmp_path_factory.mktemp("tiny-llava-orig"))


@pytest.fixture(scope="session")
def make_pairs():
    """``make_pairs(seed, size)``: three (chosen, rejected) pairs on random images of ``size`` (h, w)."""
    import numpy as np
    from PIL import Image

    from muffin import Sample

    def make(seed: int = 3, size: tuple[int, int] = (28, 36)):
        rng = np.random.default_rng(seed)
        imgs = [Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)) for _ in range(3)]
        q = ["Describe the image.", "What is on the table in this picture?", "Is there a dog?"]
        chosen = ["A red circle and a blue square.", "A cup.", "Yes."]
        rejected = ["A red circle, a dog and a green cat on the road.", "A cup and a bottle next to a tree.", "No."]
        return [(Sample(imgs[i], q[i], chosen[i]), Sample(imgs[i], q[i], rejected[i])) for i in range(3)]

    return make


@pytest.fixture(scope="session")
def grad_pass():
    """``grad_pass(fam, pairs, packed, chunk=1024)``: the answers' log-probs of ``pairs`` (``SequenceLogps``) on the
    packed or the plain path in train mode, and every parameter gradient of their sums weighted 0.5..1.5 (distinct
    weights, so no two answers' gradients can swap or cancel into agreement)."""
    import torch

    from muffin.fast.packing import packed_answer_logps, plain_answer_logps

    def run(fam, pairs, packed: bool, chunk: int = 1024):
        fam.model.train()
        fam.model.zero_grad()
        if packed:
            out = packed_answer_logps(fam, pairs, chunk=chunk)
        else:
            out = plain_answer_logps(fam, [s for p in pairs for s in p])
        (out.sums * torch.linspace(0.5, 1.5, len(out.sums), device=out.sums.device)).sum().backward()
        return out, {n: p.grad.clone() for n, p in fam.model.named_parameters() if p.grad is not None}

    return run


@pytest.fixture(scope="module")
def pairs(make_pairs):
    """The packed paths' test pairs."""
    return make_pairs()
