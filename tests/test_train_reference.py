"""Reference log-probs stage: pairs grouped by prompt (image + question encoded once, shared answers scored once)
give the numbers of scoring every pair on its own; prompt keys; batches that keep a prompt's pairs together."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from muffin.family import load_family
from muffin.train.data import PairCollator, PreferenceDataset
from muffin.train.policy import concatenated_logps
from muffin.train.reference import (
    encode_by_prompt,
    ensure_reference_logps,
    prompt_batches,
    rows_by_prompt,
    score_rows,
)
from utils.images import image_to_bytes

ANSWERS = [
    "There is a red circle next to a blue square.",
    "A dog sits on the table with a cat and a bird.",
    "Two green triangles are near the tree in the background.",
    "The image shows a car parked on the street under a lamp.",
    "There is nothing but a white wall.",
]


def rlaifv_like_rows() -> list[dict]:
    """Prompts with 1-3 pairs each, as the pipeline writes them (a prompt's pairs adjacent, answers shared between
    a prompt's pairs), plus a prompt that reuses an image with another question and one whose pairs are apart."""
    imgs = [Image.new("RGB", (40 + 7 * i, 30 + 5 * i), (50 * i % 256, 120, 200 - 30 * i)) for i in range(4)]
    spec = [  # (image, question, chosen answer, rejected answer)
        (0, "Describe the image in detail.", 0, 1),
        (0, "Describe the image in detail.", 0, 2),  # shares the chosen answer with the pair above
        (0, "Describe the image in detail.", 3, 1),  # shares the rejected answer
        (1, "What is in the picture?", 2, 4),
        (0, "What is in the picture?", 1, 3),  # same image, another question: another prompt
        (2, "Describe the image in detail.", 4, 0),
        (2, "Describe the image in detail.", 3, 0),
        (3, "How many objects?", 1, 1),  # chosen == rejected text: one row scored for both
        (1, "What is in the picture?", 0, 4),  # a pair of an earlier prompt, not adjacent to it
    ]
    return [
        {
            "image": {"bytes": image_to_bytes(imgs[im]), "path": None},
            "question": q,
            "chosen": ANSWERS[c],
            "rejected": ANSWERS[r],
            "idx": 500 + n,
            "image_path": f"img_{im}.png",
        }
        for n, (im, q, c, r) in enumerate(spec)
    ]


def write_parquet(directory: Path, rows: list[dict]) -> Path:
    import datasets

    features = datasets.Features(
        {
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "chosen": datasets.Value("string"),
            "rejected": datasets.Value("string"),
            "idx": datasets.Value("int64"),
            "image_path": datasets.Value("string"),
        }
    )
    directory.mkdir(parents=True, exist_ok=True)
    ds = datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in features}, features=features)
    ds.to_parquet(str(directory / "pairs.parquet"))
    return directory


@torch.no_grad()
def one_pair_at_a_time(fam, ds: PreferenceDataset, max_length: int) -> list[list]:
    """Every pair on its own, chosen and rejected as two sequences with full logits (the original's way)."""
    out = []
    for i in range(len(ds)):
        batch = PairCollator(fam, max_length=max_length)([ds[i]])
        logps, mask = concatenated_logps(fam, batch, packed=False)
        c, r = logps[0][mask[0]], logps[1][mask[1]]
        out.append([float(c.sum()), float(c.mean()), c.tolist(), float(r.sum()), float(r.mean()), r.tolist()])
    return out


@pytest.mark.parametrize(
    ("packing", "max_length", "workers"),
    [
        (True, 2048, 0),
        (False, 2048, 0),
        (True, 56, 0),
        (False, 56, 0),
        (True, 2048, 2),
        ("varlen", 2048, 0),
        ("varlen", 56, 0),
    ],
)
def test_grouped_scoring_equals_one_pair_at_a_time(
    tmp_path: Path, tiny_llava: Path, packing: bool | str, max_length: int, workers: int
) -> None:
    """``"varlen"``: the GPU's flat row with its varlen runs (a prompt's three or four answers as branches), forced on
    the CPU with the dense reference of the same runs."""
    fam = load_family(tiny_llava, device="cpu", dtype="fp32")
    fam.fast.packing = packing is not False
    if packing == "varlen":
        fam.fast.packed_attention = "varlen"
    ds = PreferenceDataset(write_parquet(tmp_path / "d", rlaifv_like_rows()))
    expected = one_pair_at_a_time(fam, ds, max_length)
    got = dict(score_rows(fam, ds, list(range(len(ds))), max_length=max_length, batch_size=3, num_workers=workers))
    assert sorted(got) == list(range(len(ds)))
    if max_length < 2048:  # the cut really shortens answers (it keeps the prompt), for both paths alike
        full = one_pair_at_a_time(fam, ds, 2048)
        assert any(len(e[k]) < len(f[k]) for e, f in zip(expected, full) for k in (2, 5))
    for i, e in enumerate(expected):
        g = got[i]
        for k in (0, 1, 3, 4):
            assert g[k] == pytest.approx(e[k], rel=1e-6, abs=1e-5), (i, k)
        for k in (2, 5):
            assert len(g[k]) == len(e[k]) and g[k] == pytest.approx(e[k], abs=1e-5), (i, k)


def test_prompt_grouping_encodes_each_prompt_and_answer_once(tmp_path: Path, tiny_llava: Path) -> None:
    fam = load_family(tiny_llava, device="cpu", dtype="fp32")
    ds = PreferenceDataset(write_parquet(tmp_path / "d", rlaifv_like_rows()))
    keys = [ds.prompt_key(i) for i in range(len(ds))]
    records = [ds[i] for i in range(len(ds))]
    pb = encode_by_prompt(fam, records, keys, max_length=2048)
    assert pb.rows == list(range(len(ds)))
    # 5 prompts with 4, 3 (rows 3 and 8: answers 2, 4, 0), 2, 3 and 1 distinct answers, against 18 rows pair by pair
    assert pb.batch["input_ids"].shape[0] == 4 + 3 + 2 + 3 + 1
    assert len(pb.plan.packed.prefix_len) == 5  # one packed group per prompt
    # each record points at rows holding its own chosen / rejected answer
    texts = fam.tokenizer.batch_decode(
        [ids[m] for ids, m in zip(pb.batch["input_ids"], pb.batch["answer_mask"].bool())], skip_special_tokens=True
    )
    for rec, (c, r) in zip(records, pb.answer_rows):
        assert texts[c].strip() == rec["chosen"] and texts[r].strip() == rec["rejected"]
    # the rows of one prompt use one image object, preprocessed once
    pix = pb.batch["pixel_values"]
    assert torch.equal(pix[0], pix[3])


def test_prompt_key_names_image_and_question(tmp_path: Path) -> None:
    rows = rlaifv_like_rows()
    ds = PreferenceDataset(write_parquet(tmp_path / "d", rows))
    keys = [ds.prompt_key(i) for i in range(len(ds))]
    assert keys[0] == keys[1] == keys[2] and keys[3] == keys[8] and keys[5] == keys[6]
    assert keys[0] != keys[4] != keys[3]  # image 0 with another question; another image with that question
    assert keys[0] != keys[5]  # same question, another image
    # a pair file naming images by path: keyed by the resolved path
    path = tmp_path / "j" / "pairs.jsonl"
    path.parent.mkdir()
    with path.open("w") as f:
        for r in rows:
            (path.parent / r["image_path"]).write_bytes(r["image"]["bytes"])
            f.write(json.dumps({k: r[k] for k in ("question", "chosen", "rejected", "idx", "image_path")}) + "\n")
    js = PreferenceDataset(path)
    jkeys = [js.prompt_key(i) for i in range(len(js))]
    assert [a == b for a in keys for b in keys] == [a == b for a in jkeys for b in jkeys]
    assert str(path.parent / "img_0.png") in jkeys[0]


def _keys_on_rank(rank: int, world: int, data: str, init: str, out: str) -> None:
    """One rank of ``test_prompt_keys_are_split_over_ranks`` (a forked process on gloo)."""
    import os

    import torch.distributed as tdist

    from muffin.train.reference import prompt_keys

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    tdist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        ds = PreferenceDataset(Path(data))
        hashed = []
        real = ds.prompt_key
        ds.prompt_key = lambda i: hashed.append(i) or real(i)
        keys = prompt_keys(ds)
        Path(out).write_text(json.dumps({"keys": keys, "hashed": hashed}))
    finally:
        tdist.destroy_process_group()


def test_prompt_keys_are_split_over_ranks(tmp_path: Path) -> None:
    """Two ranks (gloo, forked processes): each hashes every second row, and both end with every row's key, equal to
    one process's."""
    import multiprocessing

    data = write_parquet(tmp_path / "d", rlaifv_like_rows())
    ds = PreferenceDataset(data)
    want = [ds.prompt_key(i) for i in range(len(ds))]
    ctx = multiprocessing.get_context("fork")
    init = f"file://{tmp_path / 'rendezvous'}"
    procs = [
        ctx.Process(target=_keys_on_rank, args=(r, 2, str(data), init, str(tmp_path / f"r{r}.json"))) for r in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    for r in range(2):
        got = json.loads((tmp_path / f"r{r}.json").read_text())
        assert got["keys"] == want
        assert got["hashed"] == list(range(r, len(ds), 2))


def test_prompt_batches_keep_runs_of_a_prompt_together() -> None:
    keys = list("aabbbcdddde")
    batches = prompt_batches(keys, 3)
    assert batches == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10]]
    assert [p for b in batches for p in b] == list(range(len(keys)))
    assert prompt_batches(list("abcdefg"), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert prompt_batches([], 4) == []


def test_rows_by_prompt_gathers_each_prompt_in_first_appearance_order() -> None:
    assert rows_by_prompt(list("abacb")) == [0, 2, 1, 4, 3]
    assert rows_by_prompt([]) == []
    keys = list("xyzxxzy")
    order = rows_by_prompt(keys)
    assert sorted(order) == list(range(len(keys))) and [keys[i] for i in order] == list("xxxyyzz")


def test_reference_cache_of_scattered_prompts_equals_one_pair_at_a_time(
    tmp_path: Path, tiny_llava: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stage end to end (keys, ordering by prompt, the cache in data order): row 8 belongs to the prompt of row
    3, five rows apart, and is encoded in one batch with it; every cached value is the pair's own."""
    from muffin.train import reference

    batches: list[list[int]] = []

    def recording(family, records, keys, max_length):
        batches.append([r["row"] for r in records])
        return encode_by_prompt(family, records, keys, max_length)

    monkeypatch.setattr(reference, "encode_by_prompt", recording)
    fam = load_family(tiny_llava, device="cpu", dtype="fp32")
    ds = PreferenceDataset(write_parquet(tmp_path / "d", rlaifv_like_rows()))
    expected = one_pair_at_a_time(fam, ds, 2048)
    ensure_reference_logps(fam, ds, model_path=tiny_llava, max_length=2048, batch_size=2)
    assert sorted(r for b in batches for r in b) == list(range(len(ds)))
    assert any(3 in b and 8 in b for b in batches) and any({0, 1, 2} <= set(b) for b in batches)
    assert len(ds.ref_logps) == len(ds)
    for i, (got, e) in enumerate(zip(ds.ref_logps, expected)):
        for k in (0, 1, 3, 4):
            assert got[k] == pytest.approx(e[k], rel=1e-6, abs=1e-5), (i, k)
        for k in (2, 5):
            assert got[k] == pytest.approx(e[k], abs=1e-5), (i, k)


def test_scores_of_finished_batches_survive_a_failing_batch(tmp_path: Path, tiny_llava: Path) -> None:
    """A batch is read back while the next one runs; when the next one fails (here a corrupt image), the finished
    batch's scores are still handed out before the error."""
    from muffin.train.reference import iter_scores, prompt_batches

    fam = load_family(tiny_llava, device="cpu", dtype="fp32")
    rows = rlaifv_like_rows()
    bad = 7  # its own image: nothing else is decoded with it
    rows[bad]["image"] = {"bytes": b"not an image", "path": None}
    ds = PreferenceDataset(write_parquet(tmp_path / "d", rows))
    order = list(range(len(ds)))
    batches = prompt_batches([ds.prompt_key(i) for i in order], 3)
    failing = next(k for k, b in enumerate(batches) if bad in b)
    assert failing >= 1  # at least one finished batch before it
    got = []
    with pytest.raises(ValueError):
        for row, _ in iter_scores(fam, ds, order, max_length=2048, batch_size=3):
            got.append(row)
    assert sorted(got) == sorted(r for b in batches[:failing] for r in b)


def test_reference_cache_refuses_replaced_images_and_another_dtype(tmp_path: Path, tiny_llava: Path) -> None:
    """A pair JSONL names its images by path, so the cache used to survive a repainted image (the issue's
    'hashes the JSONL only'); and log-probs computed in bf16 were reused for an fp32 run. Both are refused now,
    naming the part that differs; unchanged data and dtype reuse the cache."""
    (tmp_path / "imgs").mkdir()
    for i in range(2):
        Image.new("RGB", (30, 20), (40 * i, 90, 160)).save(tmp_path / "imgs" / f"{i}.png")
    rows = [
        {
            "idx": i,
            "image_path": f"imgs/{i}.png",
            "question": "Describe.",
            "chosen": ANSWERS[i],
            "rejected": ANSWERS[4],
        }
        for i in range(2)
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fam = load_family(tiny_llava, device="cpu")
    kw = dict(model_path=tiny_llava, max_length=256, logps_dir=tmp_path / "logps")
    ensure_reference_logps(fam, PreferenceDataset(data), **kw)
    ensure_reference_logps(fam, PreferenceDataset(data), **kw)  # unchanged: reused
    Image.new("RGB", (30, 20), (250, 0, 0)).save(tmp_path / "imgs" / "1.png")
    with pytest.raises(ValueError, match=r"made with a different data"):
        ensure_reference_logps(fam, PreferenceDataset(data), **kw)
    Image.new("RGB", (30, 20), (40, 90, 160)).save(tmp_path / "imgs" / "1.png")  # the original bytes again
    ensure_reference_logps(fam, PreferenceDataset(data), **kw)
    bf16 = load_family(tiny_llava, device="cpu", dtype="bf16")
    with pytest.raises(ValueError, match=r"different model .*'dtype': 'torch.float32'.*'dtype': 'torch.bfloat16'"):
        ensure_reference_logps(bf16, PreferenceDataset(data), **kw)


def test_parquet_rows_without_embedded_bytes_hash_their_image_files(tmp_path: Path) -> None:
    """A parquet row that stores only a path is hashed by the file's bytes; rows with embedded bytes are in the
    parquet bytes already (no file read)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "a.png")
    rows = rlaifv_like_rows()[:2]
    rows[1]["image"] = {"bytes": None, "path": "a.png"}
    (tmp_path / "d").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d" / "x.parquet")
    ds = PreferenceDataset(tmp_path / "d", image_root=tmp_path)
    assert list(ds._rows_with_image_paths()) == [1]
    before = ds.content_hash()
    Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / "a.png")
    assert PreferenceDataset(tmp_path / "d", image_root=tmp_path).content_hash() != before


def test_weights_hash_is_the_files_sha256_and_is_remembered_until_a_file_changes(tmp_path: Path, monkeypatch) -> None:
    """``weights_hash`` = sha256 over (relative name, bytes) of the weight files and config.json in sorted order,
    computed here by hand; a second call reads no bytes (the memo, keyed on the files' names, sizes, mtimes and
    inodes); rewriting a file with other bytes of the same size changes the hash; a torn memo is ignored; with
    ``RLAIFV_HASH_MEMO=off`` nothing is remembered."""
    import hashlib

    from muffin.train import reference_cache as rc

    ckpt = tmp_path / "ckpt"
    (ckpt / "sub").mkdir(parents=True)
    files = {"config.json": b'{"a": 1}', "model.safetensors": b"\x01" * 5000, "sub/extra.bin": b"xyz"}
    for name, data in files.items():
        (ckpt / name).write_bytes(data)
    (ckpt / "tokenizer.json").write_text("{}")  # not a weight file: not hashed
    by_hand = hashlib.sha256()
    for name in sorted(files):
        by_hand.update(name.encode() + files[name])
    memo = tmp_path / "memo" / "m.json"
    monkeypatch.setenv("RLAIFV_HASH_MEMO", str(memo))
    assert rc.weights_hash(ckpt) == by_hand.hexdigest()
    assert list(json.loads(memo.read_text()).values()) == [by_hand.hexdigest()]

    calls = []
    real = rc._sha256_files
    monkeypatch.setattr(rc, "_sha256_files", lambda *a: calls.append(a) or real(*a))
    assert rc.weights_hash(ckpt) == by_hand.hexdigest() and calls == []  # remembered: no byte read

    (ckpt / "model.safetensors").write_bytes(b"\x02" * 5000)  # same size, other bytes, new mtime
    changed = rc.weights_hash(ckpt)
    assert changed != by_hand.hexdigest() and len(calls) == 1
    assert len(json.loads(memo.read_text())) == 2

    memo.write_text('{"torn')
    assert rc.weights_hash(ckpt) == changed and len(calls) == 2  # hashed again, memo rewritten
    assert list(json.loads(memo.read_text()).values()) == [changed]

    monkeypatch.setenv("RLAIFV_HASH_MEMO", "off")
    memo.unlink()
    assert rc.hash_memo_path() is None
    assert rc.weights_hash(ckpt) == changed and rc.weights_hash(ckpt) == changed and len(calls) == 4
    assert not memo.exists()
