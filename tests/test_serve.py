"""The OpenAI-compatible server (muffin.serve) on a tiny LLaVA, through real HTTP requests."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from muffin.decoding import Decoding
from muffin.family import Sample, load_family
from muffin.inference import generate
from muffin.serve import data_url, start


@pytest.fixture(scope="module")
def served(tiny_llava):
    fam = load_family(tiny_llava, device="cpu")
    httpd = start(fam, "tiny", max_logprobs=5)
    yield fam, f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(3).integers(0, 255, (28, 28, 3), dtype=np.uint8))


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url + "/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def message(image: Image.Image, text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                          {"type": "text", "text": text}]}]  # fmt: skip


def test_greedy_answer_equals_the_local_path(served, image) -> None:
    fam, url = served
    res = post(url, {"model": "tiny", "messages": message(image, "What is this?"), "temperature": 0, "max_tokens": 8})
    want = generate(fam, [Sample(image, "What is this?")], Decoding(max_new_tokens=8))[0]
    assert res["choices"][0]["message"]["content"] == want


def test_seeded_samples_repeat_and_differ(served, image) -> None:
    _, url = served
    body = {"messages": message(image, "Describe."), "temperature": 1.0, "n": 3, "seed": 7, "max_tokens": 8}
    a = [c["message"]["content"] for c in post(url, body)["choices"]]
    b = [c["message"]["content"] for c in post(url, body)["choices"]]
    assert a == b and len(a) == 3 and len(set(a)) > 1


def test_first_token_logprobs_equal_the_local_distribution(served, image) -> None:
    """Each returned top logprob equals the local next-token log-softmax of that token (the labeler's read-out)."""
    from muffin.fast.packing import prepare_next_token, run_next_token

    fam, url = served
    res = post(url, {"messages": message(image, "Is there a dog?"), "temperature": 0, "max_tokens": 1,
                     "logprobs": True, "top_logprobs": 5})  # fmt: skip
    top = res["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    local = run_next_token(fam, prepare_next_token(fam, [[Sample(image, "Is there a dog?")]], packed=False))
    local = local.log_softmax(-1)[0]
    values, ids = local.topk(5)
    assert [t["token"] for t in top] == [fam.tokenizer.decode([int(i)]) for i in ids]
    torch.testing.assert_close(torch.tensor([t["logprob"] for t in top]), values, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "body, message_part",
    [
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]}, "single-turn"),
        ({"messages": [{"role": "user", "content": "y"}], "logprobs": True, "top_logprobs": 9}, "--max-logprobs 5"),
    ],
)
def test_bad_requests_are_400_with_the_reason(served, body, message_part) -> None:
    _, url = served
    with pytest.raises(urllib.error.HTTPError) as e:
        post(url, body)
    assert e.value.code == 400 and message_part in json.loads(e.value.read())["error"]["message"]
