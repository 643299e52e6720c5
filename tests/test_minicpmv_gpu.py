"""Full-size MiniCPM-Llama3-V 2.5 (random weights, the published config) saved in shards and loaded on a GPU.

Checks what a user loading the real 8.5B checkpoint meets: sharded safetensors read straight to the GPU in bf16,
the published 448-pixel slicing (up to 9 slices + source), yes/no scores and sampling. Run with --run-gpu.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def full_size(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from safetensors.torch import save_file

    from omnilmm.minicpmv_model import MiniCPMV, MiniCPMVConfig
    from omnilmm.minicpmv_tiny import (
        CHAT_TEMPLATE,
        FORMAT_CONFIG,
        FORMAT_PREPROCESSOR,
        SPECIAL_TOKENS,
        build_llama3_style_tokenizer,
    )

    path = tmp_path_factory.mktemp("minicpmv-full")
    torch.manual_seed(0)
    with torch.device("cuda"):
        prev = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            model = MiniCPMV(MiniCPMVConfig.from_dict(FORMAT_CONFIG))
        finally:
            torch.set_default_dtype(prev)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    del model
    torch.cuda.empty_cache()
    shards: dict[str, str] = {}
    keys = sorted(sd)
    for i in range(4):  # four shards with an index, as the published seven
        name = f"model-{i + 1:05d}-of-00004.safetensors"
        part = keys[i::4]
        save_file({k: sd[k] for k in part}, str(path / name), metadata={"format": "pt"})
        shards.update(dict.fromkeys(part, name))
    total = sum(v.numel() * v.element_size() for v in sd.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": shards})
    )
    (path / "config.json").write_text(json.dumps(FORMAT_CONFIG))
    (path / "preprocessor_config.json").write_text(json.dumps(FORMAT_PREPROCESSOR))
    tok = build_llama3_style_tokenizer(SPECIAL_TOKENS)  # ids < 128256; not the published vocabulary
    tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token = "<|begin_of_text|>", "<|end_of_text|>", "<unk>", "!"
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    return path


def test_full_size_loads_scores_and_samples(full_size: Path) -> None:
    from muffin.decoding import CANDIDATE_SAMPLING
    from muffin.family import Sample, load_family
    from muffin.inference import generate, yes_no_probs

    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    fam = load_family(full_size)  # the GPU, bf16
    load_s = time.time() - t0
    params = sum(p.numel() for p in fam.model.parameters())
    assert params == 8_537_092_336 and {p.dtype for p in fam.model.parameters()} == {torch.bfloat16}
    assert all(p.device.type == "cuda" for p in fam.model.parameters())
    load_peak = torch.cuda.max_memory_allocated() / 2**30
    assert load_peak < 17.5  # 8.54B x 2 B = 15.9 GiB: no second copy of the weights

    wide, big = Image.new("RGB", (1000, 500), (200, 30, 30)), Image.new("RGB", (1344, 1344), (30, 200, 30))
    samples = [Sample(wide, "Is there a dog?"), Sample(big, "Is the image green?"), Sample(None, "Is it day?")]
    batch = fam.encode(samples, for_generation=True)
    assert [len(p) for p in batch["pixel_values"]] == [3, 10, 0]  # 1 + 2x1 ; 1 + 3x3 (9 = max_slice_nums)
    torch.cuda.synchronize()
    t0 = time.time()
    batched = yes_no_probs(fam, samples, batch_size=3)
    torch.cuda.synchronize()
    score_s = time.time() - t0
    alone = [yes_no_probs(fam, [s])[0] for s in samples]
    for (a, b), (c, d) in zip(batched, alone):
        assert a == pytest.approx(c, rel=0.05, abs=1e-4) and b == pytest.approx(d, rel=0.05, abs=1e-4)
    out = generate(fam, [samples[0]] * 4, CANDIDATE_SAMPLING.replace(max_new_tokens=8), seeds=[1, 2, 3, 4])
    assert len(out) == 4
    print(
        f"\nload {load_s:.1f}s (peak {load_peak:.1f} GiB), yes/no on 3 samples {score_s:.2f}s, "
        f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB, {torch.cuda.get_device_name()}"
    )
