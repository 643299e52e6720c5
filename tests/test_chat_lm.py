"""The one chat-LM backend (utils.chat_lm) behind divide, change-question and the judges: the texts of the code it
replaced, one instance serving a stage and a judge (a local tiny model, and ``muffin.serve`` over HTTP), the request
cache (also the files written before) and retries."""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from eval.judges import JudgeRequest, openai_judge
from muffin.feedback.changeq import ChangeqConfig, run_changeq
from muffin.feedback.divide import DivideConfig, run_divide
from utils.chat_lm.api import ApiChatLM
from utils.chat_lm.cache import CachedAnswer, RequestCache, request_key
from utils.chat_lm.hf import TINY_CHAT_TEMPLATE, HFChatLM
from utils.io import read_jsonl

PROMPTS = [
    "Split: What is it? A cat.",
    "Describe the image.",
    "The cat is black. There is a dog.",
    "Is the cat black?",
]
ANSWERS = [
    {"answer_id": f"p#{k}", "prompt_id": "p", "question": "Describe.", "answer": a, "error": None}
    for k, a in enumerate(["A cat.", "The cat is black. There is a dog.", "A red circle on the left."])
]


def build_golden_lm(path: Path) -> Path:
    """A tiny random Llama chat model whose greedy answers differ per prompt and sometimes stop early: weights drawn
    at std 0.2 (seed 2) and the ``<|eot_id|>`` row of the output head scaled by 3 (a stop becomes likely)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from utils.tokenizer import build_tokenizer

    corpus = ["### Facts:\n- The cat is black.\n- There is a dog.", "### Modified sentences:\n- Is the cat black?"]
    specials = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = build_tokenizer(corpus, vocab_size=400, extra_special_tokens=specials)
    tok.chat_template = TINY_CHAT_TEMPLATE
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    torch.manual_seed(2)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      bos_token_id=tok.bos_token_id, eos_token_id=eot, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False, initializer_range=0.2)  # fmt: skip
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight[eot] *= 3.0
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def golden_dir(tmp_path_factory) -> Path:
    return build_golden_lm(tmp_path_factory.mktemp("golden-lm"))


def test_local_texts_equal_the_replaced_implementations(golden_dir):
    """Expected texts were produced by running the code this backend replaced (``muffin.feedback.llm.ChatLM`` and
    ``eval.hf_judge.HFJudge`` at commit 3f6ada5) on this model: ChatLM gave the same greedy texts at batch sizes 1, 2
    and 4; HFJudge the same texts, 3/12/5/12 new tokens (the stop token counted) and 26/18/26/21 prompt tokens, and
    the listed texts with a system message and for a re-ask (attempt 1, sampled at T=0.7 with the attempt's seed)."""
    greedy = ["ist next", "arti}sw}hice, cup,uotstd,(", "dogotu cup,", "red dog andre?}lp} trisw fivelp}"]
    lm = HFChatLM.from_pretrained(golden_dir, device="cpu", batch_size=2)
    for size in (1, 2, 4):
        out = lm.complete([JudgeRequest.chat(user=p, max_tokens=12) for p in PROMPTS], batch_size=size)
        assert [r.text for r in out] == greedy
    assert [r.completion_tokens for r in out] == [3, 12, 5, 12] and [r.prompt_tokens for r in out] == [26, 18, 26, 21]
    system = lm.complete([JudgeRequest.chat(system="You are a judge.", user=p, max_tokens=12) for p in PROMPTS])
    assert [r.text for r in system] == [
        ".swr road,re?us", "arti}sw arti andre?}sw arti}'s", "s andou cup,@u cup,ucriives<|ot", "red"
    ]  # fmt: skip
    reask = lm.complete([JudgeRequest.chat(user=p, max_tokens=12, attempt=1) for p in PROMPTS])
    assert [r.text for r in reask] == [
        "al'sre?gle- an it", "b Thecribemivesivesv4 iDesl,b", "hic sevenre? redn an heangle Whato1 not.",
        "b Theuar,ic image?gencere?UDes and chat",
    ]  # fmt: skip


def test_divide_and_changeq_records_equal_the_replaced_implementation(golden_dir, tmp_path):
    """Raw replies recorded by run_divide / run_changeq with the old ChatLM on this model (commit 3f6ada5, batch 2,
    12 new tokens); the third changeq prompt repeats the second's claims, hence its reply."""
    lm = HFChatLM.from_pretrained(golden_dir, device="cpu")
    claims = run_divide(ANSWERS, tmp_path / "c.jsonl", DivideConfig("golden", max_new_tokens=12, batch_size=2), lm=lm,
                        progress=False)  # fmt: skip
    assert [c["divide_raw"] for c in claims] == ["sw road,re? 5 You}& 3} bir answers 3", "tab}W",
                                                 "sw road,LWot's]3 chair,criNoY"]  # fmt: skip
    fake = [{**a, "claims": ["The cat is black.", "There is a dog."][: k + 1]} for k, a in enumerate(ANSWERS)]
    qs = run_changeq(fake, tmp_path / "q.jsonl", ChangeqConfig("golden", max_new_tokens=12, batch_size=2), lm=lm,
                     progress=False)  # fmt: skip
    second = "us horse,1}O 8 chair,cri fiveM obj"
    assert [q["changeq_raw"] for q in qs] == ["'s t0 8( Answer1} answers}$er", second, second]


def test_one_local_backend_serves_divide_and_a_judge(golden_dir, tmp_path):
    """One HFChatLM answers the divide stage and scores MMHal as its judge, both through one cache file; the same
    divide again (output overwritten) is answered from the cache with no model call."""
    cache = tmp_path / "lm.sqlite"
    lm = HFChatLM.from_pretrained(golden_dir, device="cpu", cache=RequestCache(cache))
    cfg = DivideConfig("golden", max_new_tokens=8, batch_size=2)
    first = run_divide(ANSWERS, tmp_path / "c.jsonl", cfg, lm=lm, progress=False)
    assert lm.stats.calls == 3 and lm.stats.cache_hits == 0
    rec = mmhal_judge(lm, tmp_path / "samples.jsonl")
    assert rec["rating"] == 0 and isinstance(rec["judge_output"], str)  # the published rule: no rating -> 0
    assert lm.stats.calls == 4 and len(RequestCache(cache)) == 4
    again = HFChatLM.from_pretrained(golden_dir, device="cpu", cache=RequestCache(cache))
    second = run_divide(ANSWERS, tmp_path / "c.jsonl", cfg, lm=again, overwrite=True, progress=False)
    assert [r["divide_raw"] for r in second] == [r["divide_raw"] for r in first]
    assert again.stats.calls == 0 and again.stats.cache_hits == 3


class FlakyProxy:
    """Forwards chat requests to ``target``; the first requests get the statuses queued in ``faults`` (then the
    rest pass); ``forwarded`` counts what reached the model server."""

    def __init__(self, target: str) -> None:
        self.faults: list[int] = []
        self.forwarded = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if proxy.faults:
                    return self._send(proxy.faults.pop(0), b'{"error": {"message": "injected"}}')
                proxy.forwarded += 1
                req = urllib.request.Request(target + self.path, body, {"Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(req, timeout=120) as r:
                        self._send(200, r.read())
                except urllib.error.HTTPError as e:  # the server's own refusal (a 400) goes back as it is
                    self._send(e.code, e.read())

            def _send(self, status: int, data: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Retry-After", "0")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"


@pytest.fixture(scope="module")
def served(tiny_llava):
    """``muffin.serve`` on the tiny LLaVA (text-only requests), behind a proxy that injects failures."""
    from muffin.family import load_family
    from muffin.serve import start

    httpd = start(load_family(tiny_llava, device="cpu"), "tiny")
    proxy = FlakyProxy(f"http://127.0.0.1:{httpd.server_address[1]}")
    yield proxy
    proxy.httpd.shutdown()
    httpd.shutdown()


def served_lm(url: str, cache: Path, **kw) -> ApiChatLM:
    return ApiChatLM.connect("tiny", [url], id="served:tiny", api_key_env="CHAT_LM_TEST_NO_KEY", timeout=60,
                             backoff=0.01, max_backoff=0.05, cache=RequestCache(cache), **kw)  # fmt: skip


def test_one_served_backend_serves_divide_and_a_judge(served, tmp_path):
    """One ApiChatLM on ``python -m muffin.serve``'s server answers divide and the MMHal judge; a 429 and a 500 are
    retried and counted; rerun, both are served from the cache and the server sees no new request."""
    lm = served_lm(served.url, tmp_path / "r.sqlite")
    served.faults = [429, 500]
    start = served.forwarded
    cfg = DivideConfig("served:tiny", max_new_tokens=8)
    claims = run_divide(ANSWERS, tmp_path / "c.jsonl", cfg, lm=lm, progress=False)
    assert all(c["error"]["reason"].startswith("unparseable splitter output") for c in claims)  # random replies
    assert lm.stats.retries == 2 and lm.stats.calls == 5 and lm.stats.errors == 0
    assert isinstance(mmhal_judge(lm, tmp_path / "s.jsonl")["judge_output"], str) and served.forwarded - start == 4
    rerun = served_lm(served.url, tmp_path / "r.sqlite")
    again = run_divide(ANSWERS, tmp_path / "c.jsonl", cfg, lm=rerun, overwrite=True, progress=False)
    assert [r["divide_raw"] for r in again] == [r["divide_raw"] for r in claims]
    mmhal_judge(rerun, tmp_path / "s2.jsonl")
    assert rerun.stats.calls == 0 and rerun.stats.cache_hits == 4 and served.forwarded - start == 4


def mmhal_judge(lm: ApiChatLM | HFChatLM, samples: Path) -> dict:
    """One MMHal item scored by ``lm`` (a short judge prompt: the tiny served model has a short context)."""
    from eval.mmhal import attach_answers, score_mmhal
    from eval.scoring import SampleStore

    items = [{"id": 0, "question_type": "other", "image_content": ["Dog"], "question": "Q?", "gt_answer": "A."}]
    template = "Contents: {image_contents}. Q: {question}. Truth: {standard_answer}. Answer: {response}. Rating?"
    store = SampleStore(samples)
    [rec] = score_mmhal(attach_answers(items, [{"id": 0, "answer": "A dog."}]), lm, store, template=template,
                        max_tokens=8, progress=False, protocol="paper")  # fmt: skip
    store.close()
    return rec


def test_cli_retries_and_a_rerun_resends_nothing(served, tmp_path):
    """divide --splitter-server and changeq --changeq-server: a 500 is retried (the manifest counts it); the same
    command with --overwrite answers every record from ``<out>.requests.sqlite``, forwarding nothing."""
    from muffin.feedback.changeq import main as changeq
    from muffin.feedback.divide import main as divide

    answers, claims = tmp_path / "answers.jsonl", tmp_path / "claimed.jsonl"
    answers.write_text("".join(json.dumps(a) + "\n" for a in ANSWERS))
    claims.write_text("".join(json.dumps({**a, "claims": ["A red circle."]}) + "\n" for a in ANSWERS))
    common = ["--served-model", "tiny", "--max-new-tokens", "8", "--max-retries", "2"]
    runs = [
        (divide, ["--answers", str(answers), "--out", str(tmp_path / "c.jsonl"), "--splitter-server", served.url]),
        (changeq, ["--claims", str(claims), "--out", str(tmp_path / "q.jsonl"), "--changeq-server", served.url]),
    ]
    for main, argv in runs:
        out = Path(argv[3])
        served.faults = [500]
        start = served.forwarded
        main([*argv, *common])
        first = read_jsonl(out)
        requests = json.loads(out.with_suffix(".manifest.json").read_text())["config"]["requests"]
        assert requests["retries"] == 1 and requests["calls"] == 4 and served.forwarded - start == 3
        assert Path(f"{out}.requests.sqlite").is_file()
        main([*argv, *common, "--overwrite"])
        requests = json.loads(out.with_suffix(".manifest.json").read_text())["config"]["requests"]
        assert requests["calls"] == 0 and requests["cache_hits"] == 3 and served.forwarded - start == 3
        assert read_jsonl(out) == first


def test_local_cli_caches_its_calls(golden_dir, tmp_path):
    """divide --splitter CKPT caches the local model's answers too: the rerun with --overwrite makes no call."""
    from muffin.feedback.divide import main as divide

    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps(a) + "\n" for a in ANSWERS))
    argv = ["--answers", str(answers), "--out", str(tmp_path / "c.jsonl"), "--splitter", str(golden_dir),
            "--max-new-tokens", "8", "--device", "cpu"]  # fmt: skip
    divide(argv)
    manifest = tmp_path / "c.manifest.json"
    assert json.loads(manifest.read_text())["config"]["requests"]["calls"] == 3
    divide([*argv, "--overwrite"])
    requests = json.loads(manifest.read_text())["config"]["requests"]
    assert requests["calls"] == 0 and requests["cache_hits"] == 3


def test_caches_written_before_the_shared_backend_still_hit(tmp_path):
    """Cache entries in the formats the replaced code wrote, built here by hand: the served divide / changeq stages
    keyed the request as sent (one user message dict, temperature 0.0, max_tokens) under "served:MODEL" and stored
    the response body; the judges keyed (role, content) pairs with temperature, max_tokens and attempt under
    "openai:MODEL@URL" and stored the text. (Checked once against files that commit 3f6ada5's divide, changeq and
    OpenAIJudge wrote through muffin.serve.) Nothing listens at the URL, so any call would fail."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    cache = RequestCache(tmp_path / "old.sqlite")
    prompt = "Split this answer."
    sent = {"messages": [{"role": "user", "content": prompt}], "temperature": 0.0, "max_tokens": 8}
    body = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "### Facts:\n- A cat."}}]}
    cache.put(request_key("served:tiny", sent), "served:tiny", sent, CachedAnswer(json.dumps(body), 0, 0))
    judged = {"messages": [["system", "Judge."], ["user", "Rate."]], "temperature": 0.0, "max_tokens": 6, "attempt": 0}
    judge_id = f"openai:gpt-x@{dead}"
    cache.put(request_key(judge_id, judged), judge_id, judged, CachedAnswer("Rating: 5", 10, 3))

    from muffin.feedback.served import ServedModel, text_model

    lm, name = text_model("ignored", ServedModel(dead, model="tiny", cache=tmp_path / "old.sqlite", max_retries=0))
    [claims] = run_divide([{**ANSWERS[0], "answer_id": "a#0"}], tmp_path / "c.jsonl",
                          DivideConfig(name, prompt_file=str(_write(tmp_path / "t.txt", prompt)), max_new_tokens=8),
                          lm=lm, progress=False)  # fmt: skip
    assert name == "served:tiny" and claims["claims"] == ["A cat."] and lm.stats.calls == 0
    judge = openai_judge("gpt-x", base_url=dead, api_key_env="CHAT_LM_TEST_NO_KEY", max_retries=0, cache=cache)
    [resp] = judge.complete([JudgeRequest.chat(system="Judge.", user="Rate.", max_tokens=6)])
    assert resp.text == "Rating: 5" and resp.cached and judge.stats.calls == 0


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
