"""Load an image given as a path, a PIL image, raw bytes or a base64 string, with errors that name the input."""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path

from PIL import Image, UnidentifiedImageError

ImageLike = "str | Path | bytes | Image.Image"


def load_image(src: str | Path | bytes | Image.Image, *, what: str = "image") -> Image.Image:
    """Return an RGB PIL image.

    Args:
        src: a file path, a PIL image, raw encoded bytes, or a base64 string (optionally a ``data:`` URL).
        what: how to name the input in errors (e.g. ``"record 17, field 'image_path'"``).
    """
    if isinstance(src, Image.Image):
        return src.convert("RGB")
    if isinstance(src, bytes | bytearray):
        return _decode(bytes(src), what)
    if isinstance(src, Path) or (isinstance(src, str) and _looks_like_path(src)):
        path = Path(src)
        if not path.is_file():
            raise FileNotFoundError(
                f"{what}: image file '{path}' does not exist; check the path (relative paths "
                "are resolved against the current directory or the input file's --image-root)"
            )
        return _decode(path.read_bytes(), f"{what} ('{path}')")
    if isinstance(src, str):
        data = src.split(",", 1)[1] if src.startswith("data:") else src
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ValueError(f"{what}: not an existing file path and not valid base64 ({e})") from e
        return _decode(raw, f"{what} (base64)")
    raise TypeError(f"{what}: expected a path, PIL image, bytes or base64 string, got {type(src).__name__}")


def _looks_like_path(s: str) -> bool:
    if s.startswith("data:"):
        return False
    return len(s) < 1024 and ("/" in s or "\\" in s or "." in s[-6:]) and not s.endswith("==")


def _decode(raw: bytes, what: str) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(raw))
        img.load()
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{what}: cannot decode image ({e}); the file is corrupt or not an image") from e
    return img.convert("RGB")


def image_to_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def image_to_base64(img: Image.Image, fmt: str = "PNG") -> str:
    return base64.b64encode(image_to_bytes(img, fmt)).decode()
