"""Preference pairs for DPO: ``PreferenceDataset`` reads RLAIF-V-Dataset parquet (local or hub) and pipeline pair
files, images decoded lazily; ``PairCollator`` encodes chosen rows then rejected rows and cuts an answer's tail (never
the prompt) past ``max_length``. Errors name the record (``idx``) and the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from muffin.family import ModelFamily, Sample
from muffin.fast.layout import plan_batch_logps
from muffin.train.loss import ddpo_token_weights
from utils.fingerprint import sha256_file
from utils.images import classify_image_string, load_image
from utils.io import read_jsonl

logger = logging.getLogger(__name__)

TEXT_FIELDS = ("question", "chosen", "rejected")
ID_FIELDS = ("idx", "ds_question_id", "id")


class PreferenceDataset(torch.utils.data.Dataset):
    """(image, question, chosen, rejected) records; images are decoded when an item is read.

    Args:
        source: a directory of ``*.parquet`` files (the ``openbmb/RLAIF-V-Dataset`` schema: ``ds_name``, ``image``
            {bytes, path}, ``question``, ``chosen``, ``rejected``, ``origin_dataset``, ``origin_split``, ``idx``,
            ``image_path``), one ``.parquet`` file, a ``.jsonl`` pair file (``question``, ``chosen``, ``rejected``,
            an image as ``image_path`` or base64 ``image``, an id in ``idx``/``ds_question_id``/``id``), or a hub
            dataset id read with ``datasets.load_dataset``.
        split: split of a hub dataset.
        image_root: directory relative image paths start from (default: the data file's directory).

    Example:
        >>> ds = PreferenceDataset("data/RLAIF-V-Dataset")  # doctest: +SKIP
        >>> ds[0]["chosen"]                                  # doctest: +SKIP
    """

    def __init__(self, source: str | Path, *, split: str = "train", image_root: str | Path | None = None) -> None:
        self.source = str(source)
        self.image_root = Path(image_root) if image_root else None
        self.ref_logps: list[list[Any]] | None = None
        path = Path(source)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*.parquet") if not any(s.startswith(".") for s in p.parts))
            if not files:
                jsonl = sorted(path.glob("*.jsonl"))
                if len(jsonl) == 1:
                    files = jsonl
                else:
                    raise ValueError(
                        f"data directory '{path}' holds no .parquet files and {len(jsonl)} .jsonl files; "
                        "point --data at a directory of RLAIF-V-Dataset parquet files or at one pair JSONL"
                    )
        elif path.is_file():
            files = [path]
        elif _looks_like_hub_id(self.source):
            files = []
        else:
            raise FileNotFoundError(
                f"data '{source}' is neither an existing file or directory nor a hub dataset id "
                "(owner/name); check the path"
            )
        self.files = files
        if files and files[0].suffix in (".jsonl", ".json"):
            self.kind = "jsonl"
            self._rows = read_jsonl(files[0])
            self._columns = set().union(*(r.keys() for r in self._rows)) if self._rows else set()
            self._bounds = [len(self._rows)]
        elif files and all(f.suffix == ".parquet" for f in files):
            self.kind = "parquet"
            self._load_datasets(files=files)
        elif files:
            raise ValueError(
                f"data file '{files[0]}' is not .parquet or .jsonl; RLAIF-V-Dataset parquet files and "
                "pipeline pair JSONL files are supported"
            )
        else:
            self.kind = "hub"
            self._load_datasets(split=split)
        self._check_columns()
        logger.info("loaded %d preference pairs from %s (%s)", len(self), self.source, self.kind)

    # ------------------------------------------------------------------ loading
    def _load_datasets(self, files: Sequence[Path] = (), split: str = "train") -> None:
        import datasets
        import pyarrow.parquet as pq

        try:
            if files:
                ds = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")
            else:
                ds = datasets.load_dataset(self.source, split=split)
        except (OSError, ValueError, ConnectionError) as e:
            raise ValueError(
                f"cannot load preference data '{self.source}' ({type(e).__name__}: {e}). For a hub id "
                "without network, download it first (huggingface-cli download --repo-type dataset "
                f"{self.source} --local-dir data/...) and pass the directory"
            ) from e
        if "image" in ds.column_names and isinstance(ds.features["image"], datasets.Image):
            ds = ds.cast_column("image", datasets.Image(decode=False))  # decode lazily, with our errors
        self._ds = ds
        self._columns = set(ds.column_names)
        if files:  # cumulative row counts, to name the file a bad record comes from
            counts = [pq.ParquetFile(f).metadata.num_rows for f in files]
            self._bounds = [sum(counts[: i + 1]) for i in range(len(counts))]
        else:
            self.files = [Path(f["filename"]) for f in ds.cache_files]
            self._bounds = [len(ds)]

    def _check_columns(self) -> None:
        missing = [f for f in TEXT_FIELDS if f not in self._columns]
        if not ({"image", "image_path"} & self._columns):
            missing.append("image or image_path")
        if missing and len(self):
            raise ValueError(
                f"preference data '{self.source}' has no field(s) {missing}; each record needs "
                "question, chosen, rejected and an image ('image' {bytes, path} or base64, or "
                f"'image_path'). Fields found: {sorted(self._columns)}"
            )

    def __len__(self) -> int:
        return len(self._rows) if self.kind == "jsonl" else len(self._ds)

    def file_of(self, i: int) -> str:
        """The file that holds row ``i`` (the hub id for hub data), for error messages."""
        if not self.files:
            return self.source
        for bound, f in zip(self._bounds, self.files):
            if i < bound:
                return str(f)
        return str(self.files[-1])

    def raw(self, i: int) -> dict[str, Any]:
        """Row ``i`` as stored (image undecoded)."""
        return self._rows[i] if self.kind == "jsonl" else self._ds[i]

    def record_id(self, i: int, row: dict[str, Any] | None = None) -> Any:
        row = self.raw(i) if row is None else row
        return next((row[k] for k in ID_FIELDS if row.get(k) not in (None, "")), i)

    # ------------------------------------------------------------------ items
    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.raw(i)
        rid = self.record_id(i, row)
        where = f"record idx={rid} (row {i}) of {self.file_of(i)}"
        item: dict[str, Any] = {"row": i, "idx": rid, "image": self._image(row, where)}
        for f in TEXT_FIELDS:
            value = row.get(f)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{where}: field '{f}' is missing or empty; fix or drop the record")
            item[f] = value
        if self.ref_logps is not None:
            item["ref_logps"] = self.ref_logps[i]
        return item

    def prompt_key(self, i: int) -> str:
        """Identity of row ``i``'s prompt (question and image) without decoding the image: pairs with equal keys
        share their image and prompt tokens. The image is named by a hash of its stored bytes, else by its path."""
        row = self.raw(i)
        kind, value, _ = self._image_ref(row) or ("path", "", "")
        if kind == "path":
            image = f"path:{value}"
        else:
            image = "sha1:" + hashlib.sha1(value if kind == "bytes" else value.encode()).hexdigest()
        return f"{image}\n{row.get('question')}"

    def _image_ref(self, row: dict[str, Any]) -> tuple[str, Any, str] | None:
        """Where a stored row keeps its image, as (kind, value, field): ``("bytes", raw bytes, ...)``, ``("base64",
        text, ...)`` or ``("path", resolved path, ...)``; None when it has none."""
        img = row.get("image")
        if isinstance(img, dict) and img.get("bytes"):
            return "bytes", img["bytes"], "image"
        if isinstance(img, str) and img:
            kind = classify_image_string(img, self._resolve)
            return ("path", self._resolve(img), "image") if kind == "path" else ("base64", img, "image")
        path = (img.get("path") if isinstance(img, dict) else None) or row.get("image_path")
        return ("path", self._resolve(path), "image_path") if path else None

    def _image(self, row: dict[str, Any], where: str) -> Image.Image:
        ref = self._image_ref(row)
        if ref is None:
            raise ValueError(
                f"{where}: no image (field 'image' has no bytes and 'image_path' is empty); every pair needs its image"
            )
        _, value, field = ref
        return load_image(value, what=f"{where}, field '{field}'")

    def _resolve(self, path: str) -> Path:
        p = Path(path)
        if p.is_absolute():
            return p
        root = self.image_root or (self.files[0].parent if self.files else Path("."))
        return root / p

    # ------------------------------------------------------------------ identity
    def content_hash(self) -> str:
        """sha256 over the source files' bytes and the bytes of every image a row names by path (for the reference
        cache's fingerprint): a pair JSONL holds only paths, so a replaced image must change the hash too."""
        h = hashlib.sha256()
        for f in self.files:
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
        for i in self._rows_with_image_paths():
            ref = self._image_ref(self.raw(i))
            if ref is None or ref[0] != "path":
                continue
            path = Path(ref[1])
            h.update(f"{i}:{ref[1]}:".encode())
            h.update(sha256_file(path).encode() if path.is_file() else b"missing")
        return h.hexdigest()

    def _rows_with_image_paths(self) -> range | list[int]:
        """Rows whose image may be a file rather than stored bytes: every row of a JSONL; of parquet / hub data,
        the rows whose ``image`` has no bytes (read from the columns, without touching the embedded images)."""
        if self.kind == "jsonl":
            return range(len(self))
        if "image" not in self._columns:
            return range(len(self))
        import pyarrow.compute as pc

        table = self._ds.data.table if hasattr(self._ds, "data") else None
        if table is None or "image" not in table.column_names:
            return range(len(self))
        column = table.column("image")
        if not hasattr(column.type, "get_field_index") or column.type.get_field_index("bytes") < 0:
            return range(len(self))
        missing = pc.is_null(pc.struct_field(column, "bytes"))
        return [i for i, m in enumerate(missing.to_pylist()) if m]

    def attach_logps(self, logps: Sequence[Any]) -> None:
        """Attach the reference log-probs (one ``logps`` list per row, see ``muffin.train.reference``)."""
        if len(logps) != len(self):
            raise ValueError(
                f"{len(logps)} reference log-prob rows for {len(self)} pairs of '{self.source}'; "
                "recompute the cache (python -m muffin.train.reference ... --overwrite)"
            )
        self.ref_logps = [json.loads(x) if isinstance(x, str) else x for x in logps]


def _looks_like_hub_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "~")) and not s.endswith((".jsonl", ".parquet"))


def pair_groups(batch: dict[str, Any]) -> list[list[int]]:
    """Rows of a pair batch (chosen rows, then rejected rows) that share image and prompt: ``[[b, B + b], ...]``."""
    n = batch["input_ids"].shape[0] // 2
    return [[b, n + b] for b in range(n)]


class PairCollator:
    """Encode pairs as one batch: chosen rows 0..B-1, rejected rows B..2B-1, with the truncation policy applied.

    The batch is ``family.encode``'s (input_ids, attention_mask, answer_mask, vision inputs) cut to ``max_length``,
    plus ``rows`` (B,) dataset rows, ``truncated`` (2B,) bool, and when the records carry reference log-probs
    ``ref_per_token`` (2B, T-1) aligned with ``token_logps``; with ``ddpo_gamma != 1`` also ``token_weights``; with
    ``packing`` (the trainer's decision to take the shared-prefix path), ``packing_plan``
    (``muffin.fast.layout.plan_batch_logps``), so that the packing's Python work runs in the DataLoader workers
    instead of in each training step.
    """

    def __init__(
        self, family: ModelFamily, *, max_length: int = 2048, ddpo_gamma: float = 1.0, packing: bool = False
    ) -> None:
        self.family = family
        self.max_length = max_length
        self.ddpo_gamma = ddpo_gamma
        self.packing = packing

    def __call__(self, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        samples = [Sample(r["image"], r["question"], r["chosen"]) for r in records]
        samples += [Sample(r["image"], r["question"], r["rejected"]) for r in records]
        batch = truncate_batch(self.family.encode(samples), self.max_length, [r["idx"] for r in records] * 2)
        batch["rows"] = torch.tensor([r["row"] for r in records])
        mask = batch["answer_mask"][:, 1:].bool()  # (2B, T-1), aligned with token_logps
        if all("ref_logps" in r for r in records):
            batch["ref_per_token"] = _ref_per_token(records, mask)
        if self.ddpo_gamma != 1.0:
            batch["token_weights"] = self._ddpo_weights(batch["input_ids"][:, 1:], mask)
        if self.packing:  # the packed path's CPU work, done here (in DataLoader workers)
            batch["packing_plan"] = plan_batch_logps(self.family, batch, pair_groups(batch))
        return batch

    def _ddpo_weights(self, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        weights = torch.ones(mask.shape, dtype=torch.float32)  # (2B, T-1)
        n = labels.shape[0] // 2
        for b in range(n):
            wc, wr = ddpo_token_weights(
                labels[b][mask[b]].tolist(), labels[n + b][mask[n + b]].tolist(), self.ddpo_gamma
            )
            weights[b][mask[b]] = torch.tensor(wc)
            weights[n + b][mask[n + b]] = torch.tensor(wr)
        return weights


def truncate_batch(batch: dict[str, torch.Tensor], max_length: int, ids: Sequence[Any]) -> dict[str, torch.Tensor]:
    """Cut every (B, T) tensor of a right-padded batch to ``max_length`` and record which rows lost answer tokens.

    The answer sits at the end of each row, so the cut removes the answer's tail (its end-of-turn token first) and
    never a prompt or image token; a row whose prompt alone reaches ``max_length`` raises, naming the record.
    """
    ids_t = batch["input_ids"]
    truncated = batch.get("truncated", torch.zeros(ids_t.shape[0], dtype=torch.bool)).bool()
    if ids_t.shape[1] > max_length:
        truncated = truncated | batch["attention_mask"][:, max_length:].bool().any(-1)
        shape = ids_t.shape
        batch = {
            k: (v[:, :max_length] if torch.is_tensor(v) and v.dim() >= 2 and v.shape[:2] == shape else v)
            for k, v in batch.items()
        }
    empty = ~batch["answer_mask"][:, 1:].any(-1)
    if empty.any():
        b = int(empty.nonzero()[0, 0])
        raise ValueError(
            f"record idx={ids[b]}: the prompt (image tokens included) fills model_max_length="
            f"{max_length}, leaving no answer token; raise --model_max_length or drop the record"
        )
    batch["truncated"] = truncated
    return batch


def _ref_per_token(records: Sequence[dict[str, Any]], mask: torch.Tensor) -> torch.Tensor:
    """Cached per-token reference log-probs placed at the answer positions of ``mask`` (2B, T-1)."""
    out = torch.zeros(mask.shape, dtype=torch.float32)
    n = len(records)
    for b, r in enumerate(records):
        for row, values, what in ((b, r["ref_logps"][2], "chosen"), (n + b, r["ref_logps"][5], "rejected")):
            if len(values) != int(mask[row].sum()):
                raise ValueError(
                    f"record idx={r['idx']}: the cached reference log-probs have {len(values)} {what} tokens but the "
                    f"encoding has {int(mask[row].sum())}; the cache was made with another template, tokenizer or max "
                    "length. Recompute it: python -m muffin.train.reference ... --overwrite"
                )
            out[row][mask[row]] = torch.tensor(values, dtype=torch.float32)
    return out
