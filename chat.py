"""Chat with any supported checkpoint: ``RLAIFVChat(model_path).chat({"image": ..., "question": ...})``.

    python chat.py --model-path openbmb/RLAIF-V-7B --image car.jpg --question "Why did the car stop?"
    python chat.py          # offline demo: the shipped synthetic-world policy describes a scene it draws

Decoding follows the paper for each family (LLaVA 1.5: 3 beams, greedy, up to 1024 new tokens; OmniLMM 12B: beam
sampling). GPU in bf16 when there is one, CPU in float32 otherwise.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from muffin.decoding import CANDIDATE_SAMPLING, Decoding
from muffin.family import TRUST_REMOTE_CODE_HELP, Sample, load_family
from muffin.inference import generate
from utils.images import load_image

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent
# With no --model-path: the ~1M-parameter base policy of the synthetic world that the CPU demo ships (a clone has it;
# it describes coloured shapes, nothing else). Real checkpoints are passed with --model-path.
DEMO_MODEL = REPO / "script" / "demo" / "assets" / "world_seed0" / "base"
DEMO_QUESTION = "Describe the image in detail."
DEFAULT_QUESTION = "Describe this image in detail."


class RLAIFVChat:
    """A chat model from a local checkpoint directory (or a hub id that can be downloaded).

    Args:
        model_path: checkpoint directory of any supported family, or a hub id.
        lora_path: optional LoRA adapter directory merged at load.
        trust_remote_code: run the Python code shipped with the checkpoint (MiniCPM-Llama3-V 2.5's own) instead of
            this project's implementation; off by default.
        device / dtype: default ``cuda`` + bf16 when a GPU is present, else ``cpu`` + float32.
        decoding: override the family's paper decoding (``muffin.decoding.Decoding``).
        best_of: N > 1 samples N answers (``best_of_decoding``, T 0.7 by default) and returns the one with the highest
            self-feedback reward (``muffin.reward``: per-token average of beta * log(pi_reward / pi_reference)).
        reward / reward_reference: the reward's aligned checkpoint (default: this model) and its reference (the
            instruct base it was aligned from; required for best_of > 1).
        seed: first sampling seed of best-of-N (answer i uses seed + i), so a call is repeatable.

    Example:
        >>> chat = RLAIFVChat("checkpoints/RLAIF-V-7B")  # doctest: +SKIP
        >>> chat.chat({"image": "car.jpg", "question": "Why did the car in the picture stop?"})  # doctest: +SKIP
        >>> bon = RLAIFVChat("checkpoints/RLAIF-V-7B", best_of=8, reward_reference="checkpoints/llava-v1.5-7b")  # doctest: +SKIP
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        lora_path: str | Path | None = None,
        trust_remote_code: bool = False,
        device: str | None = None,
        dtype: torch.dtype | str | None = None,
        decoding: Decoding | None = None,
        best_of: int = 1,
        reward: str | Path | None = None,
        reward_reference: str | Path | None = None,
        best_of_decoding: Decoding | None = None,
        seed: int = 0,
    ) -> None:
        if best_of < 1:
            raise ValueError(f"best_of must be >= 1, got {best_of}")
        if best_of > 1 and reward_reference is None:
            raise ValueError(
                "best_of > 1 needs reward_reference: the checkpoint the reward model was aligned from (e.g. LLaVA 1.5 "
                "7B for RLAIF-V 7B); the reward is their per-token log-ratio"
            )
        self.family = load_family(
            resolve_checkpoint(model_path),
            device=device,
            dtype=dtype,
            lora_path=lora_path,
            trust_remote_code=trust_remote_code,
        )
        self.decoding = decoding or self.family.chat_decoding
        self.best_of, self.seed, self.reward = best_of, seed, None
        self.best_of_decoding = best_of_decoding or CANDIDATE_SAMPLING.replace(
            max_new_tokens=self.decoding.max_new_tokens
        )
        if best_of > 1:
            from muffin.reward import reward_for

            self.reward = reward_for(
                self.family,
                resolve_checkpoint(model_path),
                None if reward is None else resolve_checkpoint(reward),
                resolve_checkpoint(reward_reference),
                policy_lora=lora_path,
                device=device,
                dtype=dtype,
            )

    def chat(self, inputs: dict[str, Any]) -> str:
        """Answer ``inputs["question"]`` about ``inputs["image"]`` (a path, PIL image or base64 string)."""
        if not isinstance(inputs, dict):
            raise TypeError(f"chat() takes a dict with 'image' and 'question', got {type(inputs).__name__}")
        question = inputs.get("question")
        if not isinstance(question, str) or not question.strip():
            raise ValueError(
                "chat(): 'question' is missing or empty; pass {'image': ..., 'question': 'your question'}"
            )
        image = inputs.get("image")
        img: Image.Image | None = None if image is None else load_image(image, what="chat(): 'image'")
        if self.reward is not None:
            from muffin.reward import best_of_n

            return best_of_n(
                self.family, self.reward, img, question, self.best_of, self.best_of_decoding, seed=self.seed
            ).answer
        return generate(self.family, [Sample(img, question)], self.decoding, batch_size=1)[0]


def resolve_checkpoint(model_path: str | Path) -> Path:
    """A local directory as is; a hub id through ``snapshot_download``, with one clear line when that fails."""
    path = Path(model_path)
    if path.exists():
        return path
    if str(model_path).count("/") != 1:
        raise FileNotFoundError(f"model path '{model_path}' does not exist and is not a hub id (owner/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    if not os.environ.get("HF_HUB_OFFLINE") and not _hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = "1"  # only the local cache can help now; skip minutes of retries
    try:
        return Path(snapshot_download(str(model_path)))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise FileNotFoundError(
            f"cannot download '{model_path}' ({type(e).__name__}); download it where the hub is reachable "
            f"(huggingface-cli download {model_path} --local-dir DIR) and pass --model-path DIR"
        ) from e


def _hub_reachable(timeout: float = 3.0) -> bool:
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def demo_scene(index: int = 0) -> tuple[Image.Image, str]:
    """Scene ``index`` of the seed-0 synthetic world's test split (the world the demo policy was trained on, but a
    scene it never saw), drawn in memory, and a line naming what is really in it."""
    from muffin.world.scenes import WorldConfig, make_scene, render

    scene = make_scene(WorldConfig(seed=0), "test", index)
    truth = ", ".join(f"{'an' if o.colour[0] in 'aeiou' else 'a'} {o.colour} {o.cls}" for o in scene.objects)
    return render(scene), truth


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Ask a question about an image with an RLAIF-V (or any supported) model. With no arguments, "
        "the synthetic world's shipped demo policy describes a scene drawn on the fly (offline, seconds on a CPU)."
    )
    p.add_argument("--model-path", default=None, help="checkpoint directory or hub id (default: the demo policy)")
    p.add_argument("--lora-path", default=None, help="LoRA adapter directory to merge at load")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_REMOTE_CODE_HELP)
    p.add_argument(
        "--image",
        default=None,
        help="image path, data URL or base64 string (default: a synthetic-world scene, see --scene)",
    )
    p.add_argument(
        "--scene", type=int, default=0, help="which synthetic-world test scene to draw when --image is unset"
    )
    p.add_argument("--question", default=None, help=f"default: '{DEMO_QUESTION}' / '{DEFAULT_QUESTION}'")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"])
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--best-of", type=int, default=1, help="sample N answers, return the highest-reward one")
    p.add_argument("--reward-model", default=None, help="the reward's aligned checkpoint (default: --model-path)")
    p.add_argument("--reward-reference", default=None, help="the reward's reference checkpoint (needed by --best-of)")
    p.add_argument("--seed", type=int, default=0, help="first sampling seed of --best-of")
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    demo = args.model_path is None
    try:
        if demo and not (DEMO_MODEL / "config.json").is_file():
            raise FileNotFoundError(
                f"the demo policy is not at {DEMO_MODEL} (it ships with a clone of the repository); "
                "pass --model-path CKPT"
            )
        bot = RLAIFVChat(
            DEMO_MODEL if demo else args.model_path,
            lora_path=args.lora_path,
            trust_remote_code=args.trust_remote_code,
            device=args.device,
            dtype=args.dtype,
            best_of=args.best_of,
            reward=args.reward_model,
            reward_reference=args.reward_reference,
            seed=args.seed,
        )
        if args.max_new_tokens:
            bot.decoding = bot.decoding.replace(max_new_tokens=args.max_new_tokens)
            bot.best_of_decoding = bot.best_of_decoding.replace(max_new_tokens=args.max_new_tokens)
        image = args.image
        if image is None:
            image, truth = demo_scene(args.scene)
            print(f"[synthetic scene {args.scene} of the seed-0 world test split; it holds: {truth}]", file=sys.stderr)
        question = args.question or (DEMO_QUESTION if demo else DEFAULT_QUESTION)
        print(bot.chat({"image": image, "question": question}))
    except (FileNotFoundError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
