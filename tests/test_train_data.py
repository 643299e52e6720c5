"""Preference data: RLAIF-V parquet and pair JSONL readers, lazy images with named errors, truncation policy.

Also home of the small builders (``write_rlaifv_parquet``, ``write_pair_jsonl``) the other trainer tests import.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from muffin.train.data import PairCollator, PreferenceDataset, truncate_batch
from utils.images import image_to_bytes

QUESTIONS = ["Describe the image in detail.", "What is in the picture?", "How many objects?", "Is there a dog?"]
CHOSEN = ["There is a red circle.", "The image shows a car on the road.", "There are two blue squares.", "No."]
REJECTED = [
    "There is a dog and a cat on the table.",
    "The image shows a bus, a train and a horse.",
    "There are five green triangles next to the tree.",
    "Yes, there is a dog in the sky.",
]


def pair_rows(n: int = 4) -> list[dict]:
    rows = []
    for i in range(n):
        img = Image.new("RGB", (40 + 3 * i, 30), ((60 * i) % 256, 120, 200 - 30 * i))
        rows.append(
            {
                "ds_name": "test",
                "image": {"bytes": image_to_bytes(img), "path": None},
                "question": QUESTIONS[i % 4],
                "chosen": CHOSEN[i % 4],
                "rejected": REJECTED[i % 4],
                "origin_dataset": "unit",
                "origin_split": json.dumps({"split": "train"}),
                "idx": 100 + i,
                "image_path": f"img_{i}.png",
            }
        )
    return rows


def write_rlaifv_parquet(directory: Path, n: int = 4, files: int = 1) -> Path:
    """RLAIF-V-Dataset schema written with ``datasets`` (so the image column carries the Image feature)."""
    import datasets

    features = datasets.Features(
        {
            "ds_name": datasets.Value("string"),
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "chosen": datasets.Value("string"),
            "rejected": datasets.Value("string"),
            "origin_dataset": datasets.Value("string"),
            "origin_split": datasets.Value("string"),
            "idx": datasets.Value("int64"),
            "image_path": datasets.Value("string"),
        }
    )
    rows = pair_rows(n)
    directory.mkdir(parents=True, exist_ok=True)
    per = (n + files - 1) // files
    for f in range(files):
        chunk = rows[f * per : (f + 1) * per]
        ds = datasets.Dataset.from_dict({k: [r[k] for r in chunk] for k in features}, features=features)
        ds.to_parquet(str(directory / f"RLAIF-V-Dataset_{f:03d}.parquet"))
    return directory


def write_pair_jsonl(path: Path, n: int = 4) -> Path:
    """A feedback-pipeline pair file: images as files next to it, referenced by relative ``image_path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i, r in enumerate(pair_rows(n)):
            (path.parent / r["image_path"]).write_bytes(r["image"]["bytes"])
            f.write(
                json.dumps(
                    {
                        "ds_question_id": f"q{i}",
                        "image_path": r["image_path"],
                        "question": r["question"],
                        "chosen": r["chosen"],
                        "rejected": r["rejected"],
                    }
                )
                + "\n"
            )
    return path


def test_parquet_directory_reads_rlaifv_schema(tmp_path: Path) -> None:
    ds = PreferenceDataset(write_rlaifv_parquet(tmp_path / "d", n=5, files=2))
    assert ds.kind == "parquet" and len(ds) == 5
    item = ds[3]
    assert item["idx"] == 103 and item["row"] == 3
    assert item["chosen"] == CHOSEN[3] and item["rejected"] == REJECTED[3]
    assert item["image"].size == (49, 30) and item["image"].mode == "RGB"
    assert ds.file_of(4).endswith("RLAIF-V-Dataset_001.parquet")  # rows 0-2 in file 0, rows 3-4 in file 1
    assert ds.file_of(2).endswith("RLAIF-V-Dataset_000.parquet")


def test_pair_jsonl_resolves_relative_images(tmp_path: Path) -> None:
    ds = PreferenceDataset(write_pair_jsonl(tmp_path / "pairs" / "pairs.jsonl", n=3))
    assert ds.kind == "jsonl" and len(ds) == 3
    assert ds[1]["idx"] == "q1" and ds[1]["image"].size == (43, 30)


def test_corrupt_image_names_record_and_file(tmp_path: Path) -> None:
    path = write_pair_jsonl(tmp_path / "p.jsonl", n=2)
    (tmp_path / "img_1.png").write_bytes(b"not a png")
    ds = PreferenceDataset(path)
    ds[0]  # fine: decoding is lazy, only the bad record fails
    with pytest.raises(ValueError, match=r"record idx=q1 \(row 1\) of .*p\.jsonl, field 'image_path'.*cannot decode"):
        ds[1]


def test_missing_field_named(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    write_pair_jsonl(path, n=2)
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    rows[1]["chosen"] = ""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"record idx=q1 .* field 'chosen' is missing or empty"):
        PreferenceDataset(path)[1]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "q", "chosen": "a", "image_path": "x.png"}) + "\n")
    with pytest.raises(ValueError, match=r"no field\(s\) \['rejected'\]"):
        PreferenceDataset(tmp_path / "bad.jsonl")


def test_unknown_source_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="neither an existing file"):
        PreferenceDataset(tmp_path / "nope" / "x.parquet")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="not .parquet or .jsonl"):
        PreferenceDataset(tmp_path / "x.csv")


def test_truncation_cuts_answer_tail_only() -> None:
    """Row 0: 3 prompt + 4 answer tokens, row 1: 3 prompt + 2 answer; max_length 5 cuts row 0's last 2 answer tokens."""
    batch = {
        "input_ids": torch.tensor([[1, 9, 9, 5, 6, 7, 2], [1, 9, 9, 5, 2, 0, 0]]),
        "attention_mask": torch.tensor([[1] * 7, [1] * 5 + [0, 0]]),
        "answer_mask": torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 0, 0]]).bool(),
        "pixel_values": torch.zeros(2, 3, 4, 4),
    }
    out = truncate_batch(batch, 5, ["a", "b"])
    assert out["input_ids"].tolist() == [[1, 9, 9, 5, 6], [1, 9, 9, 5, 2]]
    assert out["truncated"].tolist() == [True, False]
    assert out["pixel_values"].shape == (2, 3, 4, 4)  # vision inputs are never cut
    with pytest.raises(ValueError, match="record idx=a: the prompt .* fills model_max_length=3"):
        truncate_batch(batch, 3, ["a", "b"])


def test_collator_stacks_chosen_then_rejected(tiny_llava: Path, tmp_path: Path) -> None:
    from muffin.family import Sample, load_family

    fam = load_family(tiny_llava, device="cpu")
    ds = PreferenceDataset(write_rlaifv_parquet(tmp_path / "d", n=2))
    batch = PairCollator(fam, max_length=2048)([ds[0], ds[1]])
    alone = fam.encode([Sample(ds[1]["image"], ds[1]["question"], ds[1]["rejected"])])
    width = int(alone["attention_mask"].sum())
    assert batch["input_ids"].shape[0] == 4 and batch["rows"].tolist() == [0, 1]
    assert batch["input_ids"][3, :width].tolist() == alone["input_ids"][0, :width].tolist()  # row 3 = rejected of 1
    # a max length that cuts into the longest answer marks exactly the rows that lost answer tokens
    lengths = batch["attention_mask"].sum(-1)
    cut = PairCollator(fam, max_length=int(lengths.max()) - 1)([ds[0], ds[1]])
    assert cut["truncated"].tolist() == (lengths == lengths.max()).tolist()


def test_collator_plans_the_packing_in_dataloader_workers(tiny_llava: Path, tmp_path: Path) -> None:
    """PairCollator(packing=True) adds the packed path's plan; it survives DataLoader workers (pickled), and
    concatenated_logps with it gives exactly the numbers of planning in the step; packing=False (the trainer's
    decision when it will not pack) plans nothing."""
    from muffin.family import load_family
    from muffin.fast.layout import LogpsPlan
    from muffin.train.policy import concatenated_logps

    fam = load_family(tiny_llava, device="cpu")
    ds = PreferenceDataset(write_rlaifv_parquet(tmp_path / "d", n=4))
    collate = PairCollator(fam, max_length=2048, packing=True)
    loader = torch.utils.data.DataLoader([ds[i] for i in range(4)], batch_size=2, collate_fn=collate, num_workers=2)
    batches = list(loader)
    assert len(batches) == 2 and all(isinstance(b["packing_plan"], LogpsPlan) for b in batches)
    with torch.no_grad():
        for batch in batches:
            planned = concatenated_logps(fam, batch)
            inline = concatenated_logps(fam, {k: v for k, v in batch.items() if k != "packing_plan"})
            assert torch.equal(planned[0], inline[0]) and torch.equal(planned[1], inline[1])
    assert "packing_plan" not in PairCollator(fam, max_length=2048, packing=False)([ds[0]])
