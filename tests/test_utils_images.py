"""Images are decoded by content: data URL, an existing file, or strict base64; anything else names the record."""

from __future__ import annotations

import base64
import json

import pytest
from PIL import Image

from utils.images import classify_image_string, image_to_base64, image_to_bytes, load_image


def _small_b64_with_slash() -> str:
    """A small PNG whose base64 is short (< 1024 chars), contains '/' and does not end in '==': the shape the old
    length-and-characters guess took for a path (issue 32 item 4)."""
    for w in range(1, 9):
        for r in range(0, 256, 5):
            s = image_to_base64(Image.new("RGB", (w, 2), (r, 7, 9)))
            if "/" in s and not s.endswith("==") and len(s) < 1024:
                return s
    raise AssertionError("no colour gave such a string")


def test_small_base64_is_decoded_not_taken_for_a_path() -> None:
    s = _small_b64_with_slash()
    img = load_image(s, what="record 3, field 'image'")
    assert img.size[1] == 2
    assert classify_image_string(s) == "base64"


def test_data_url_path_and_bytes(tmp_path) -> None:
    img = Image.new("RGB", (3, 5), (10, 20, 30))
    url = "data:image/png;base64," + image_to_base64(img)
    assert load_image(url).getpixel((1, 1)) == (10, 20, 30)
    (tmp_path / "x.png").write_bytes(image_to_bytes(img))
    assert load_image(str(tmp_path / "x.png")).size == (3, 5)
    assert load_image(tmp_path / "x.png").size == (3, 5)
    assert load_image(image_to_bytes(img)).size == (3, 5)
    # a file whose name happens to be valid base64 is a file: existence is checked before the base64 reading
    (tmp_path / "abcd").write_bytes(image_to_bytes(img))
    assert classify_image_string(str(tmp_path / "abcd")) == "path"


def test_bad_image_fields_name_the_record(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="record 7, field 'image'.*neither an existing image file"):
        load_image("imgs/missing.jpg", what="record 7, field 'image'")
    with pytest.raises(TypeError, match="record 8, field 'image': .*got int"):
        load_image(5, what="record 8, field 'image'")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="record 9.*cannot decode image.*not an existing file either"):
        load_image("abcd", what="record 9")  # valid base64 of 3 bytes that are no image
    with pytest.raises(ValueError, match="record 10: a 'data:' URL must read"):
        load_image("data:image/png,rawbytes", what="record 10")
    with pytest.raises(ValueError, match="record 11: the data URL's payload is not valid base64"):
        load_image("data:image/png;base64,#!?", what="record 11")


def test_prompt_file_and_pair_jsonl_take_small_base64(tmp_path) -> None:
    """The feedback pipeline's prompt file and the DPO pair JSONL read the same small base64 image (and refuse an
    ``image`` that is a number, naming the line)."""
    from muffin.feedback.records import load_prompts
    from muffin.train.data import PreferenceDataset

    s = _small_b64_with_slash()
    rows = [
        {"ds_question_id": "a", "image": s, "question": "Q?"},
        {"ds_question_id": "b", "image": 5, "question": "Q?"},
        {"ds_question_id": "c", "image": "data:image/png;base64," + s, "question": "Q?"},
    ]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts, errors = load_prompts(tmp_path / "p.jsonl")
    assert [p.id for p in prompts] == ["a", "c"]
    assert [p.load_image().size[1] for p in prompts] == [2, 2]
    assert prompts[0].image_bytes() == base64.b64decode(s)
    assert len(errors) == 1 and "line 2 (id 'b'): field 'image' is a int" in errors[0]["reason"]

    (tmp_path / "sub").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "sub" / "f.png")
    pairs = [
        {"idx": 0, "image": s, "question": "q", "chosen": "c", "rejected": "r"},
        {"idx": 1, "image": "sub/f.png", "question": "q", "chosen": "c", "rejected": "r"},
    ]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    ds = PreferenceDataset(tmp_path / "pairs.jsonl")
    assert ds[0]["image"].size[1] == 2 and ds[1]["image"].size == (4, 4)
