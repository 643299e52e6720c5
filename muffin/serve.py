"""An OpenAI-compatible chat-completions server for any supported checkpoint (what `vllm serve` offers, for our own
families): single-turn requests with one image, ``n`` samples, ``seed``, ``temperature`` / ``top_p``, and the first
token's ``top_logprobs``. The served backends of the feedback stages are tested against it, and it serves a model
of ours where no engine runs it.

    python -m muffin.serve --model CKPT [--host 127.0.0.1] [--port 8000] [--max-logprobs 20]
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import threading
import time
import uuid
from collections.abc import Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from muffin.decoding import Decoding
from muffin.family import ModelFamily, Sample, load_family
from muffin.feedback.stage import stable_seed
from muffin.inference import generate
from utils.images import load_image

logger = logging.getLogger(__name__)


class BadRequest(ValueError):
    """A request this server cannot answer; sent back as HTTP 400 with the message."""


def parse_messages(messages: Any) -> tuple[Image.Image | None, str]:
    """(image, text) of a single-turn chat: an optional system message is refused (each family applies its own
    template), the user message holds text parts and at most one image (a data URL or base64)."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list")
    if len(messages) != 1 or not isinstance(messages[0], dict) or messages[0].get("role") != "user":
        raise BadRequest("only single-turn requests are served: one message with role 'user'")
    content = messages[0].get("content")
    if isinstance(content, str):
        return None, content
    if not isinstance(content, list):
        raise BadRequest("message content must be a string or a list of parts")
    texts, images = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(str(part.get("text", "")))
        elif kind == "image_url":
            url = (part.get("image_url") or {}).get("url") if isinstance(part.get("image_url"), dict) else None
            if not isinstance(url, str) or not url.startswith("data:"):
                raise BadRequest("image parts must carry a data URL (data:image/...;base64,...)")
            images.append(load_image(url, what="request image"))
        else:
            raise BadRequest(f"unsupported content part type {kind!r}")
    if len(images) > 1:
        raise BadRequest(f"at most one image per request, got {len(images)}")
    return (images[0] if images else None), "\n".join(texts)


def data_url(image: Image.Image) -> str:
    """A PNG data URL of ``image`` (what clients put in an ``image_url`` part)."""
    from utils.images import image_to_bytes

    return "data:image/png;base64," + base64.b64encode(image_to_bytes(image)).decode()


class ChatServer:
    """Answers chat-completion requests with a loaded family; one request at a time on the model (a lock)."""

    def __init__(self, family: ModelFamily, model_name: str, max_logprobs: int = 20) -> None:
        self.family, self.model_name, self.max_logprobs = family, model_name, max_logprobs
        self.lock = threading.Lock()

    def complete(self, req: dict[str, Any]) -> dict[str, Any]:
        image, text = parse_messages(req.get("messages"))
        n = int(req.get("n") or 1)
        max_tokens = int(req.get("max_completion_tokens") or req.get("max_tokens") or 512)
        temperature = float(req.get("temperature", 1.0))
        top_p = float(req.get("top_p", 1.0))
        top_logprobs = int(req.get("top_logprobs") or 0) if req.get("logprobs") else 0
        if not 1 <= n <= 128 or max_tokens < 1:
            raise BadRequest(f"need 1 <= n <= 128 and max_tokens >= 1, got n={n}, max_tokens={max_tokens}")
        if top_logprobs > self.max_logprobs:
            raise BadRequest(f"top_logprobs {top_logprobs} exceeds this server's --max-logprobs {self.max_logprobs}")
        greedy = temperature == 0
        decoding = Decoding(
            max_new_tokens=max_tokens, do_sample=not greedy, temperature=temperature or 1.0, top_p=top_p
        )
        seed = req.get("seed")
        seeds = (
            None
            if greedy
            else [stable_seed("serve", seed if seed is not None else uuid.uuid4().hex, i) for i in range(n)]
        )
        with self.lock:
            texts = generate(self.family, [Sample(image, text)] * n, decoding, seeds=seeds, batch_size=n)
            first = self._first_token_logprobs(image, text, top_logprobs) if req.get("logprobs") else None
        choices = []
        for i, t in enumerate(texts):
            choice: dict[str, Any] = {
                "index": i,
                "message": {"role": "assistant", "content": t},
                "finish_reason": "stop",
            }
            if first is not None:
                choice["logprobs"] = {"content": [first]}
            choices.append(choice)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": choices,
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        }

    @torch.inference_mode()
    def _first_token_logprobs(self, image: Image.Image | None, text: str, k: int) -> dict[str, Any]:
        """The first answer token's distribution: its argmax and the top ``k`` entries, with token texts."""
        from muffin.fast.packing import prepare_next_token, run_next_token

        logp = run_next_token(self.family, prepare_next_token(self.family, [[Sample(image, text)]])).log_softmax(-1)[0]
        values, ids = logp.topk(max(k, 1))
        tok = self.family.tokenizer

        def entry(i: int, v: float) -> dict[str, Any]:
            s = tok.decode([i])
            return {"token": s, "logprob": v, "bytes": list(s.encode())}

        top = [entry(int(i), float(v)) for i, v in zip(ids, values)]
        return {**top[0], "top_logprobs": top[:k]}


def make_handler(server: ChatServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": server.model_name, "object": "model"}]})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self) -> None:  # noqa: N802
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            try:
                req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                self._send(200, server.complete(req))
            except (BadRequest, json.JSONDecodeError, ValueError, TypeError) as e:
                self._send(HTTPStatus.BAD_REQUEST, {"error": {"message": str(e), "type": "invalid_request_error"}})

        def log_message(self, fmt: str, *args: Any) -> None:
            logger.debug("%s " + fmt, self.address_string(), *args)

    return Handler


def start(family: ModelFamily, model_name: str, host: str = "127.0.0.1", port: int = 0, max_logprobs: int = 20):
    """Serve ``family`` in a background thread; returns the ``ThreadingHTTPServer`` (``server_address`` has the
    port; ``shutdown()`` stops it)."""
    httpd = ThreadingHTTPServer((host, port), make_handler(ChatServer(family, model_name, max_logprobs)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Serve a checkpoint behind an OpenAI-compatible chat-completions API.")
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--served-model-name", default=None, help="the name clients pass as 'model' (default: the path)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-logprobs", type=int, default=20, help="largest top_logprobs a request may ask for")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    family = load_family(args.model, device=args.device, dtype=args.dtype)
    name = args.served_model_name or str(Path(args.model))
    httpd = ThreadingHTTPServer((args.host, args.port), make_handler(ChatServer(family, name, args.max_logprobs)))
    logger.info("serving %s at http://%s:%d/v1", name, args.host, httpd.server_address[1])
    httpd.serve_forever()


if __name__ == "__main__":
    main()
