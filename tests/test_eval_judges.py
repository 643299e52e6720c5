"""The OpenAI-compatible judge against a real HTTP server on 127.0.0.1, the judge cache, and the local HF judge.

The server speaks /v1/chat/completions and is scripted by a keyword in the last message: RATE_LIMIT_ONCE (429
then success), ALWAYS_500, SLOW (sleeps past the client timeout), SLOW_ONCE, MALFORMED (a 200 whose body is not
JSON), AUTH (401); anything else gets the reply registered for a substring of the message, else "Rating: 4".
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from eval.judges import JudgeFatalError, JudgeRequest, hf_judge, openai_judge
from utils.chat_lm.api import ApiChatLM
from utils.chat_lm.cache import RequestCache


class ScriptedServer:
    """A chat-completions server in a thread; ``hits`` counts requests per scripted keyword / message."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.replies: dict[str, str | list[str]] = {}
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep pytest output clean
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.handle(self, body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def handle(self, h: BaseHTTPRequestHandler, body: dict) -> None:
        content = body["messages"][-1]["content"]
        with self.lock:
            self.hits[content] += 1
            n = self.hits[content]
        assert h.path.endswith("/chat/completions")
        if "AUTH" in content:
            return self._send(h, 401, {"error": {"message": "bad key", "type": "invalid_request_error"}})
        if "RATE_LIMIT_ONCE" in content and n == 1:
            return self._send(h, 429, {"error": {"message": "slow down", "type": "rate_limit"}}, {"Retry-After": "0"})
        if "ALWAYS_500" in content:
            return self._send(h, 500, {"error": {"message": "boom", "type": "server_error"}})
        if "SLOW" in content and ("SLOW_ONCE" not in content or n == 1):
            time.sleep(1.5)
        if "MALFORMED" in content:
            return self._send_raw(h, 200, b"this is not json {")
        text = next((v for k, v in self.replies.items() if k in content), "Rating: 4")
        if isinstance(text, list):  # one reply per hit, the last one repeated
            text = text[min(n, len(text)) - 1]
        usage = {"prompt_tokens": len(content.split()), "completion_tokens": len(text.split())}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        payload = {
            "id": "c1",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "usage": usage,
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
        }
        self._send(h, 200, payload)

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, code: int, obj: dict, headers: dict | None = None) -> None:
        ScriptedServer._send_raw(h, code, json.dumps(obj).encode(), headers)

    @staticmethod
    def _send_raw(h: BaseHTTPRequestHandler, code: int, data: bytes, headers: dict | None = None) -> None:
        try:
            h.send_response(code)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out and hung up

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def server():
    s = ScriptedServer()
    yield s
    s.close()


def make_judge(server: ScriptedServer, tmp_path: Path, **kw) -> ApiChatLM:
    opts = {"timeout": 0.5, "concurrency": 4, "max_retries": 2, "backoff": 0.01, "max_backoff": 0.05}
    opts.update(kw)
    return openai_judge(
        "test-judge",
        base_url=server.base_url,
        api_key_env="EVAL_TEST_NO_SUCH_KEY",
        cache=RequestCache(tmp_path / "cache.sqlite"),
        **opts,
    )


def ask(text: str) -> JudgeRequest:
    return JudgeRequest.chat(system="You are a judge.", user=text)


def test_success_counts_tokens_and_second_run_is_served_from_cache(server, tmp_path):
    server.replies["cat"] = "[[B]]"
    judge = make_judge(server, tmp_path)
    out = judge.complete([ask("a cat"), ask("a dog")])
    assert [r.text for r in out] == ["[[B]]", "Rating: 4"]
    assert judge.stats.calls == 2 and judge.stats.cache_hits == 0
    assert judge.stats.prompt_tokens == 4 and judge.stats.completion_tokens == 3  # "a cat","a dog"; 1 + 2 words
    again = make_judge(server, tmp_path)  # a new process would open the same cache file
    out2 = again.complete([ask("a cat"), ask("a dog")])
    assert [r.text for r in out2] == ["[[B]]", "Rating: 4"] and all(r.cached for r in out2)
    assert again.stats.calls == 0 and again.stats.cache_hits == 2
    assert sum(server.hits.values()) == 2  # the server saw each request once


def test_rate_limit_then_success_is_retried(server, tmp_path):
    judge = make_judge(server, tmp_path)
    [resp] = judge.complete([ask("RATE_LIMIT_ONCE please")])
    assert resp.error is None and resp.text == "Rating: 4"
    assert server.hits["RATE_LIMIT_ONCE please"] == 2 and judge.stats.retries == 1


def test_server_error_gives_up_after_bounded_retries_and_is_not_cached(server, tmp_path):
    judge = make_judge(server, tmp_path, max_retries=2)
    [resp] = judge.complete([ask("ALWAYS_500")])
    assert resp.text is None and resp.retryable and "HTTP 500" in resp.error
    assert server.hits["ALWAYS_500"] == 3  # 1 try + 2 retries
    assert len(RequestCache(tmp_path / "cache.sqlite")) == 0  # failures are not cached: a rerun tries again


def test_timeouts_are_retried(server, tmp_path):
    judge = make_judge(server, tmp_path, max_retries=1)
    slow, slow_once = judge.complete([ask("SLOW"), ask("SLOW_ONCE")])
    assert slow.text is None and slow.retryable and "Timeout" in slow.error
    assert slow_once.text == "Rating: 4" and server.hits["SLOW_ONCE"] == 2


def test_malformed_body_is_recorded_not_raised(server, tmp_path):
    judge = make_judge(server, tmp_path, max_retries=1)
    good, bad = judge.complete([ask("fine"), ask("MALFORMED")])
    assert good.text == "Rating: 4"
    assert bad.text is None and bad.error is not None and server.hits["MALFORMED"] == 2
    assert judge.stats.errors == 1


def test_auth_error_is_fatal(server, tmp_path):
    judge = make_judge(server, tmp_path)
    with pytest.raises(JudgeFatalError, match="API key"):
        judge.complete([ask("AUTH")])


def test_answers_are_cached_as_they_arrive(server, tmp_path):
    """A batch that stops half way (the third request is refused: a fatal error) keeps the two answers before it."""
    judge = make_judge(server, tmp_path, concurrency=1)
    with pytest.raises(JudgeFatalError):
        judge.complete([ask("one"), ask("two"), ask("AUTH")])
    assert len(RequestCache(tmp_path / "cache.sqlite")) == 2
    again = make_judge(server, tmp_path)
    assert [r.cached for r in again.complete([ask("one"), ask("two")])] == [True, True]


def test_missing_key_for_openai_names_the_variable(monkeypatch):
    monkeypatch.delenv("EVAL_TEST_NO_SUCH_KEY", raising=False)
    with pytest.raises(JudgeFatalError, match="EVAL_TEST_NO_SUCH_KEY"):
        openai_judge("gpt-4o", api_key_env="EVAL_TEST_NO_SUCH_KEY")


def test_attempt_is_part_of_the_cache_key(server, tmp_path):
    judge = make_judge(server, tmp_path)
    judge.complete([ask("same")])
    judge.complete([JudgeRequest.chat(system="You are a judge.", user="same", attempt=1)])
    assert server.hits["same"] == 2 and judge.stats.cache_hits == 0


def test_mmhal_end_to_end_through_the_server(server, tmp_path):
    """Three items. Item 0's judge says "Rating: 5"; item 1's first answer has no rating and the re-ask answers
    "Rating: 1"; item 2's judge never gives a rating (recorded as unparseable after 1 + 1 attempts).

    Hand computation: rated (5, 1) -> score 3.0, hallucination rate 1/2 (1 < 3); with the published rule
    (unparseable = 0, unparsed="zero"): (5 + 1 + 0) / 3 = 2.0, hallucination rate 2/3."""
    from eval.mmhal import attach_answers, score_mmhal, summarize
    from eval.scoring import SampleStore

    items = [
        {"id": i, "question_type": t, "image_content": ["Dog"], "question": "q?", "gt_answer": "gt"}
        for i, t in enumerate(["counting", "holistic", "holistic"])
    ]
    answers = [
        {"id": 0, "answer": "ANSWER_ZERO"},
        {"id": 1, "answer": "ANSWER_ONE"},
        {"id": 2, "answer": "ANSWER_TWO"},
    ]
    items = attach_answers(items, answers)
    server.replies.update(
        {"ANSWER_ZERO": "Good. Rating: 5", "ANSWER_ONE": ["I cannot decide.", "Rating: 1"], "ANSWER_TWO": "no idea"}
    )
    judge = make_judge(server, tmp_path)
    store = SampleStore(tmp_path / "samples.jsonl")
    records = score_mmhal(items, judge, store, reasks=1, progress=False, protocol="ours")
    assert [r["rating"] for r in records] == [5, 1, None]
    assert records[1]["attempts"] == 2
    assert records[2]["error"] == "unparseable rating after 2 attempts" and records[2]["judge_output"] == "no idea"
    summary = summarize(records)
    assert summary["lenient_score"] == 3.0 and summary["lenient_hallucination_rate"] == 0.5
    assert summary["lenient_score_by_type"] == {"counting": 5.0, "holistic": 1.0} and summary["n_unrated"] == 1
    zero = summarize(records, unparsed="zero")
    assert zero["lenient_score"] == 2.0 and zero["lenient_hallucination_rate"] == pytest.approx(2 / 3)


@pytest.fixture(scope="module")
def tiny_judge_dir(tmp_path_factory) -> Path:
    """A tiny random Llama causal LM with an offline tokenizer and a chat template: it answers garbage."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from utils.tokenizer import build_tokenizer

    path = tmp_path_factory.mktemp("tiny-judge")
    tok = build_tokenizer(["Rating: 5. [[A]] [[B]] [[C]] The answer lists a dog and a cat."], vocab_size=400)
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_hf_judge_batches_caches_and_records_garbage(tiny_judge_dir, tmp_path):
    """The tiny judge's output is random text: MMHal scoring must record it as unparseable, not crash; a rerun
    with the same cache makes no new model call."""
    from eval.mmhal import attach_answers, score_mmhal, summarize
    from eval.scoring import SampleStore

    judge = hf_judge(tiny_judge_dir, batch_size=2, cache=RequestCache(tmp_path / "c.sqlite"))
    reqs = [JudgeRequest.chat(user=f"Rate answer {i}.", max_tokens=6) for i in range(3)]
    out = judge.complete(reqs)
    assert all(isinstance(r.text, str) and r.error is None for r in out)
    assert judge.stats.calls == 3 and all(0 < r.completion_tokens <= 6 for r in out)
    # batched generation (left padding) gives the same greedy text as one by one
    alone = hf_judge(tiny_judge_dir, batch_size=1).complete(reqs)
    assert [r.text for r in alone] == [r.text for r in out]

    items = [{"id": 0, "question_type": "other", "image_content": ["Dog"], "question": "Q?", "gt_answer": "A."}]
    items = attach_answers(items, [{"id": 0, "answer": "A dog."}])
    template = "Contents: {image_contents}. Q: {question}. Truth: {standard_answer}. Answer: {response}. Rating?"
    store = SampleStore(tmp_path / "samples.jsonl")
    recs = score_mmhal(items, judge, store, template=template, reasks=1, max_tokens=8, progress=False, protocol="ours")
    store.close()
    # a random model does not write "Rating: k" (odds ~1e-6 per token with a 400-token vocabulary)
    assert recs[0]["rating"] is None and recs[0]["error"] == "unparseable rating after 2 attempts"
    assert isinstance(recs[0]["judge_output"], str) and summarize(recs)["n_rated"] == 0
    calls = judge.stats.calls
    rerun = hf_judge(tiny_judge_dir, batch_size=2, cache=RequestCache(tmp_path / "c.sqlite"))
    rerun.complete(reqs)
    assert rerun.stats.calls == 0 and rerun.stats.cache_hits == 3 and calls >= 4


def test_hf_judge_prompt_too_long_is_a_per_request_error(tiny_judge_dir):
    judge = hf_judge(tiny_judge_dir, batch_size=2)
    long, short = judge.complete(
        [JudgeRequest.chat(user="dog " * 5000, max_tokens=4), JudgeRequest.chat(user="dog", max_tokens=4)]
    )
    assert long.text is None and "exceeds the model's context of 4096" in long.error
    assert isinstance(short.text, str)


def test_mmhal_cli_paper_protocol_through_the_server(server, tmp_path, reference_dir, capsys):
    """The 96 published items and prompt. Item 0 rated 6, item 1's reply has two ratings (0 by the published rule),
    the rest "Rating: 4". Average (6 + 0 + 94 x 4) / 96 = 382/96; hallucination rate 1/96; informativeness
    (3 + 0 + 94 x 1) / 96 / 3 x 100; per type (index mod 8): type 0 (6 + 11 x 4)/12, type 1 (0 + 11 x 4)/12, rest 4."""
    from eval import mmhal

    eval_dir = reference_dir / "data" / "rlaifv-original" / "eval"
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"id": i, "answer": f"ANS_{i}_END"}) + "\n" for i in range(96)))
    server.replies.update({"ANS_0_END": "Rating: 6", "ANS_1_END": "Rating: 2, no: Rating: 5"})
    out = tmp_path / "out"
    argv = ["--answers", str(answers), "--template", str(eval_dir / "mmhal-bench_answer_template.json")]
    argv += ["--prompt-file", str(reference_dir / "prompts" / "mmhal_judge.txt"), "--out-dir", str(out)]
    argv += ["--base-url", server.base_url, "--api-key-env", "EVAL_TEST_NO_SUCH_KEY", "--judge-model", "m"]
    mmhal.main(argv)
    m = json.loads((out / "results.json").read_text())["metrics"]
    assert (m["average_score"], m["hallucination_rate"]) == pytest.approx((382 / 96, 1 / 96))
    assert m["informativeness"] == pytest.approx(97 / 96 / 3 * 100) and m["n_rating_not_found"] == 1
    assert list(m["average_score_by_type"].values()) == pytest.approx([50 / 12, 44 / 12] + [4.0] * 6)
    printed = capsys.readouterr().out
    assert "Average score: 3.98\nHallucination rate: 0.01\n" in printed
    assert "Average score for each question type: 4.17,3.67,4.0,4.0,4.0,4.0,4.0,4.0" in printed
    assert sum(server.hits.values()) == 96  # no re-ask


def test_refomb_cli_paper_protocol_through_the_server(server, tmp_path, reference_dir, capsys):
    """The 99 published items: item 0's review says [[A]] (a loss); every other review first quotes the format,
    'output "[[B]]" if B is better', then concludes [[C]]: the published rule takes the first match, B (a win).
    Score (0 + 98 x 1) / 99; one loss in the category table."""
    from eval import refomb

    ref = reference_dir / "data" / "rlaifv-original" / "eval" / "gpt4v_RefoMB_dev_0521.jsonl"
    items = refomb.load_refomb_items(ref)
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"id": it["id"], "answer": f"ANS_{it['id']}_END"}) + "\n" for it in items))
    server.replies.update(
        {
            f"ANS_{items[0]['id']}_END": "Model A is better. [[A]]",
            "[End of Model B's answer]": 'output "[[B]]" if B is better. Verdict: [[C]]',
        }
    )
    out = tmp_path / "o"
    argv = ["overall", "--answers", str(answers), "--reference", str(ref), "--out-dir", str(out)]
    argv += ["--prompt-file", str(reference_dir / "prompts" / "refomb_pairwise_system.txt")]
    argv += ["--base-url", server.base_url, "--api-key-env", "EVAL_TEST_NO_SUCH_KEY", "--judge-model", "m"]
    refomb.main(argv)
    m = json.loads((out / "results.json").read_text())["metrics"]
    run = m["runs"]["0"]
    assert m["score"] == pytest.approx(98 / 99) and (run["wins"], run["losses"], run["ties"]) == (98, 1, 0)
    assert sum(int(v.split("/")[1]) for v in run["categories"].values()) == 1
    assert "run 0: Score is 0.990  win 98  loss 1  tie 0" in capsys.readouterr().out
