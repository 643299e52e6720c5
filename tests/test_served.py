"""Served feedback backends (muffin.feedback.served) against a real HTTP server on a tiny LLaVA (muffin.serve),
behind a proxy that injects faults: 429, 500, a timeout, a malformed body, a missing logprobs field."""

from __future__ import annotations

import json
import math
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

from muffin.decoding import Decoding
from muffin.family import Sample, load_family
from muffin.feedback.served import (
    ServedModel,
    choice_texts,
    first_token_alternatives,
    labeler_request,
    sampling_request,
    yes_no_from_logprobs,
)
from muffin.inference import generate, yes_no_token_ids
from muffin.serve import start


class FaultProxy:
    """Forwards to ``target``; ``faults`` is a list consumed one per request: "429", "500", "timeout", "garbage",
    "no-logprobs" or None (forward)."""

    def __init__(self, target: str) -> None:
        self.target, self.faults, self.seen = target, [], 0
        proxy = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                proxy.seen += 1
                fault = proxy.faults.pop(0) if proxy.faults else None
                if fault in ("429", "500"):
                    return self._send(int(fault), b'{"error": {"message": "injected"}}', {"Retry-After": "0"})
                if fault == "timeout":
                    time.sleep(1.5)
                req = urllib.request.Request(proxy.target + self.path, body, {"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=120) as r:
                    data = r.read()
                if fault == "garbage":
                    data = b'{"choices": "not a list"'
                elif fault == "no-logprobs":
                    res = json.loads(data)
                    for c in res["choices"]:
                        c.pop("logprobs", None)
                    data = json.dumps(res).encode()
                self._send(200, data)

            def _send(self, status: int, data: bytes, headers: dict | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"


@pytest.fixture(scope="module")
def setup(tiny_llava):
    fam = load_family(tiny_llava, device="cpu")
    vocab = fam.model.get_output_embeddings().weight.shape[0]  # every logit (the head is padded past the tokenizer)
    httpd = start(fam, "tiny", max_logprobs=vocab)
    target = f"http://127.0.0.1:{httpd.server_address[1]}"
    proxies = [FaultProxy(target), FaultProxy(target)]
    yield fam, vocab, proxies
    httpd.shutdown()
    for p in proxies:
        p.httpd.shutdown()


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(9).integers(0, 255, (30, 30, 3), dtype=np.uint8))


def model(proxies, tmp_path, **kw) -> ServedModel:
    return ServedModel([p.url for p in proxies], model="tiny", cache=tmp_path / "cache.sqlite", timeout=1.0,
                       max_retries=3, backoff=0.01, **kw)  # fmt: skip


def test_served_greedy_answers_equal_the_local_path(setup, image, tmp_path) -> None:
    fam, _, proxies = setup
    sm = model(proxies[:1], tmp_path)
    res = sm.call(sampling_request(image, "What is this?", n=1, seed=0, temperature=0.0, top_p=1.0, max_tokens=8))
    assert choice_texts(res.response) == generate(fam, [Sample(image, "What is this?")], Decoding(max_new_tokens=8))


def test_served_p_yes_equals_the_local_distribution(setup, image, tmp_path) -> None:
    """P(yes) from the first token's alternatives equals the local next-token distribution summed over the same
    tokens (those whose text is yes / Yes), which include the local labeler's own yes ids."""
    from muffin.fast.packing import prepare_next_token, run_next_token

    fam, vocab, proxies = setup
    sm = model(proxies[:1], tmp_path)
    q = "Is there a dog in the image?"
    p_yes, p_no = yes_no_from_logprobs(sm.call(labeler_request(image, q, top_logprobs=vocab)).response)
    probs = run_next_token(fam, prepare_next_token(fam, [[Sample(image, q)]], packed=False)).softmax(-1)[0]
    words = [fam.tokenizer.decode([i]).strip() for i in range(probs.numel())]
    yes_ids = [i for i, w in enumerate(words) if w in ("yes", "Yes")]
    no_ids = [i for i, w in enumerate(words) if w in ("no", "No")]
    assert set(yes_no_token_ids(fam)[0]) <= set(yes_ids) and set(yes_no_token_ids(fam)[1]) <= set(no_ids)
    assert p_yes == pytest.approx(float(probs[yes_ids].sum()), rel=1e-4)
    assert p_no == pytest.approx(float(probs[no_ids].sum()), rel=1e-4)


def test_faults_are_retried_and_counted(setup, image, tmp_path) -> None:
    """429, 500, a timeout and a malformed body, one after the other, then the answer; the same request again is a
    cache hit that sends nothing."""
    fam, _, proxies = setup
    sm = model(proxies[:1], tmp_path)
    proxies[0].faults = ["429", "500", "timeout"]
    req = sampling_request(image, "Describe.", n=3, seed=4, temperature=1.0, top_p=1.0, max_tokens=6)
    res = sm.call(req, validate=choice_texts)
    assert res.error is None and len(choice_texts(res.response)) == 3
    assert sm.stats.retries == 3 and sm.stats.errors == 0
    proxies[0].faults = ["garbage"]
    res2 = sm.call(sampling_request(image, "Describe.", n=2, seed=5, temperature=1.0, top_p=1.0, max_tokens=6),
                   validate=choice_texts)  # fmt: skip
    assert res2.error is None and sm.stats.retries == 4
    seen = proxies[0].seen
    again = sm.call(req, validate=choice_texts)
    assert proxies[0].seen == seen and again.response == res.response and sm.stats.cache_hits == 1
    # seeded samples repeat on a fresh cache
    fresh = model(proxies[:1], tmp_path / "other").call(req, validate=choice_texts)
    assert choice_texts(fresh.response) == choice_texts(res.response)


def test_missing_logprobs_end_as_a_recorded_error(setup, image, tmp_path) -> None:
    fam, _, proxies = setup
    sm = model(proxies[:1], tmp_path)
    proxies[0].faults = ["no-logprobs"] * 4  # every attempt
    res = sm.call(labeler_request(image, "Is it red?", top_logprobs=5), validate=first_token_alternatives)
    assert res.response is None and "no first-token top_logprobs" in res.error and sm.stats.errors == 1
    with pytest.raises(ValueError, match="neither 'yes' nor 'no'"):
        yes_no_from_logprobs(
            {"choices": [{"logprobs": {"content": [{"top_logprobs": [{"token": "x", "logprob": 0}]}]}}]}
        )


def test_requests_spread_over_servers(setup, image, tmp_path) -> None:
    fam, _, proxies = setup
    sm = model(proxies, tmp_path, concurrency=4)
    before = [p.seen for p in proxies]
    reqs = [sampling_request(image, f"Q{i}?", n=1, seed=i, temperature=1.0, top_p=1.0, max_tokens=3) for i in range(6)]
    out = sm.map(reqs, validate=choice_texts)
    assert all(o.error is None for o in out)
    assert [p.seen - b for p, b in zip(proxies, before)] == [3, 3]
    assert math.isclose(sum(len(choice_texts(o.response)) for o in out), 6)
    torch.manual_seed(0)
