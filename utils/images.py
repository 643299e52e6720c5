"""Load an image given as a path, a PIL image, raw bytes, base64 or a data URL, with errors that name the input.

A string is classified by its content, never by its length: a ``data:`` URL is decoded; a string naming an
existing file is read; any other string must be strict base64 of an encoded image. Anything else is an error that
says which of the three it failed to be.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from collections.abc import Callable
from pathlib import Path

from PIL import Image, UnidentifiedImageError

ImageLike = "str | Path | bytes | Image.Image"

_B64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")
_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,")


def decode_base64(text: str) -> bytes | None:
    """The bytes of strict base64 ``text`` (whitespace such as line breaks ignored), or None when it is not
    base64: characters outside the alphabet, padding in the middle, or a length that is not a multiple of 4."""
    compact = "".join(text.split())
    if not compact or len(compact) % 4 or not _B64.fullmatch(compact):
        return None
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        return None


def decode_data_url(url: str, what: str = "image") -> bytes:
    """The payload of a ``data:[<mime>][;base64],<data>`` URL; raises ValueError naming ``what`` otherwise."""
    m = _DATA_URL.match(url)
    if m is None or not m.group("b64"):
        raise ValueError(
            f"{what}: a 'data:' URL must read 'data:image/<type>;base64,<base64 data>' (got {url[:40]!r}...)"
        )
    raw = decode_base64(url[m.end() :])
    if raw is None:
        raise ValueError(f"{what}: the data URL's payload is not valid base64")
    return raw


def classify_image_string(s: str, resolve: Callable[[str], Path] = Path) -> str:
    """``"data_url"``, ``"path"`` or ``"base64"``: what an image string is, decided by its content.

    ``resolve`` maps the string to the file it would name (e.g. against an image root). A string that names an
    existing file is a path; one that is strict base64 is base64; any other string is taken as a path, so that the
    error a caller gets is "file does not exist" (the likelier mistake for a string that cannot be base64).
    """
    if s.startswith("data:"):
        return "data_url"
    try:
        if resolve(s).is_file():
            return "path"
    except (OSError, ValueError):  # a megabyte of base64 is not a valid file name on every OS
        pass
    return "base64" if decode_base64(s) is not None else "path"


def load_image(src: str | Path | bytes | Image.Image, *, what: str = "image") -> Image.Image:
    """Return an RGB PIL image.

    Args:
        src: a file path, a PIL image, raw encoded bytes, a base64 string or a ``data:`` URL.
        what: how to name the input in errors (e.g. ``"record 17, field 'image_path'"``).
    """
    if isinstance(src, Image.Image):
        return src.convert("RGB")
    if isinstance(src, bytes | bytearray):
        return _decode(bytes(src), what)
    if isinstance(src, Path):
        return _read_path(src, what)
    if isinstance(src, str):
        kind = classify_image_string(src)
        if kind == "data_url":
            return _decode(decode_data_url(src, what), f"{what} (data URL)")
        if kind == "base64":
            try:
                return _decode(decode_base64(src) or b"", f"{what} (base64)")
            except ValueError as e:
                raise ValueError(
                    f"{e}; the string is not an existing file either (a short path made of letters and digits "
                    "only reads as base64: check it)"
                ) from e
        return _read_path(Path(src), what)
    raise TypeError(
        f"{what}: expected a file path, base64 image data, a data URL, bytes or a PIL image, got "
        f"{type(src).__name__}; fix that record's image field"
    )


def _read_path(path: Path, what: str) -> Image.Image:
    if not path.is_file():
        raise FileNotFoundError(
            f"{what}: '{str(path)[:80]}' is neither an existing image file nor base64 image data nor a data URL; "
            "check the path (relative paths are resolved against the current directory or the input file's "
            "--image-root)"
        )
    return _decode(path.read_bytes(), f"{what} ('{path}')")


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
