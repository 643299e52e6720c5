"""Stage 7, export: balanced pairs -> parquet in the RLAIF-V-Dataset schema, images embedded, ready for training.

    python -m muffin.feedback.export --pairs work/balanced.jsonl --prompts prompts.jsonl --image-root DIR \
        --out work/RLAIF-V-llava15.parquet --question-type detailed_description

Columns: ds_name, image {bytes, path}, question, chosen, rejected, origin_dataset, origin_split (a JSON string
naming the policy ``model``, the labeler ``feedback_model`` and the question ``type``), idx, image_path. The file
carries Hugging Face ``datasets`` metadata, so ``load_dataset("parquet", ...)`` decodes ``image`` as an Image.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from muffin.feedback.records import Prompt, load_prompts, prompts_by_id
from muffin.feedback.stage import errors_path, finish_stage, load_records, whole_file_fingerprint
from utils.dist import is_main, setup_logging
from utils.fingerprint import code_digest
from utils.io import atomic_write_text, temp_file_for

logger = logging.getLogger(__name__)

SCHEMA = pa.schema(
    [
        ("ds_name", pa.string()),
        ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        ("question", pa.string()),
        ("chosen", pa.string()),
        ("rejected", pa.string()),
        ("origin_dataset", pa.string()),
        ("origin_split", pa.string()),
        ("idx", pa.int64()),
        ("image_path", pa.string()),
    ]
)
_HF_FEATURES = {
    name: {"dtype": "int64" if name == "idx" else "string", "_type": "Value"}
    for name in SCHEMA.names
    if name != "image"
}
_HF_FEATURES["image"] = {"_type": "Image"}
HF_METADATA = {b"huggingface": json.dumps({"info": {"features": {n: _HF_FEATURES[n] for n in SCHEMA.names}}}).encode()}


def origin_split(policy: str | None, labeler: str | None, question_type: str) -> str:
    """The ``origin_split`` JSON string: ``{"model": policy, "feedback_model": labeler, "type": question type}``."""
    return json.dumps({"model": policy, "feedback_model": labeler, "type": question_type})


def export_rows(
    pairs: Sequence[dict[str, Any]],
    prompts: dict[str, Prompt],
    *,
    ds_name: str,
    origin_dataset: str,
    question_type: str,
    errors: list[dict[str, Any]],
) -> Iterator[dict[str, Any]]:
    """Rows of the dataset in pair order; a pair whose image cannot be read is appended to ``errors`` instead."""
    idx = 0
    for p in pairs:
        prompt = prompts.get(p["prompt_id"])
        try:
            if prompt is None:
                raise ValueError(f"prompt '{p['prompt_id']}' is not in the --prompts file")
            prompt.load_image()  # validate: never embed bytes that do not decode
            data = prompt.image_bytes()
        except (OSError, ValueError) as e:
            errors.append({"id": p["pair_id"], "stage": "export", "reason": str(e)})
            continue
        meta = prompt.metainfos
        yield {
            "ds_name": ds_name,
            "image": {"bytes": data, "path": prompt.image_path},
            "question": p["question"],
            "chosen": p["chosen"],
            "rejected": p["rejected"],
            "origin_dataset": str(meta.get("origin_dataset") or origin_dataset),
            "origin_split": origin_split(p.get("policy"), p.get("labeler"), str(meta.get("type") or question_type)),
            "idx": idx,
            "image_path": prompt.image_path,
        }
        idx += 1


def write_parquet(rows: Iterator[dict[str, Any]], out: str | Path, *, rows_per_group: int = 500) -> int:
    """Stream ``rows`` into ``out`` (written to a temporary file, then renamed: never a half-written parquet)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_for(out)
    os.close(fd)
    n = 0
    try:
        with pq.ParquetWriter(tmp, SCHEMA.with_metadata(HF_METADATA)) as writer:
            buf: list[dict[str, Any]] = []
            for row in rows:
                buf.append(row)
                if len(buf) >= rows_per_group:
                    writer.write_table(pa.Table.from_pylist(buf, schema=SCHEMA.with_metadata(HF_METADATA)))
                    n, buf = n + len(buf), []
            if buf or n == 0:
                writer.write_table(pa.Table.from_pylist(buf, schema=SCHEMA.with_metadata(HF_METADATA)))
                n += len(buf)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n


def run_export(
    pairs: Sequence[dict[str, Any]],
    prompts: Sequence[Prompt],
    out: str | Path,
    *,
    ds_name: str = "RLAIF-V",
    origin_dataset: str = "",
    question_type: str = "detailed_description",
) -> dict[str, Any]:
    """Write the parquet and its errors file; returns counts."""
    errors: list[dict[str, Any]] = []
    rows = export_rows(
        pairs,
        prompts_by_id(list(prompts)),
        ds_name=ds_name,
        origin_dataset=origin_dataset,
        question_type=question_type,
        errors=errors,
    )
    n = write_parquet(rows, out)
    if errors:
        atomic_write_text(
            errors_path(Path(out).with_suffix(".jsonl")),
            "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in errors),
        )
    return {"pairs_in": len(pairs), "rows": n, "image_errors": len(errors)}


def export_fingerprint(
    pairs: str | Sequence[dict[str, Any]], prompts: Sequence[Prompt], settings: dict[str, Any]
) -> dict[str, Any]:
    """The pairs (file or records), the bytes of every prompt image (they are embedded), the settings, the code."""
    return whole_file_fingerprint(
        "export",
        inputs={
            "pairs": pairs if isinstance(pairs, str) else list(pairs),
            "images": {p.id: p.image_sha256() for p in prompts},
        },
        settings=settings,
        code=code_digest(run_export),
    )


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Export balanced pairs as an RLAIF-V-Dataset parquet file.")
    p.add_argument("--pairs", required=True, help="balance stage output")
    p.add_argument("--prompts", required=True, help="the generate stage's input JSONL (for the images)")
    p.add_argument("--image-root", default=None)
    p.add_argument("--out", required=True, help="output .parquet")
    p.add_argument("--ds-name", default="RLAIF-V", help="value of the ds_name column")
    p.add_argument(
        "--origin-dataset", default=None, help="default: metainfos.origin_dataset, else the prompt file's name"
    )
    p.add_argument(
        "--question-type",
        default="detailed_description",
        help="the 'type' in origin_split (metainfos.type wins when present)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = make_parser().parse_args(argv)
    setup_logging()
    if not is_main():
        return
    started = time.time()
    prompts, _ = load_prompts(args.prompts, args.image_root)
    counts = run_export(
        load_records(args.pairs, "pairs"),
        prompts,
        args.out,
        ds_name=args.ds_name,
        origin_dataset=args.origin_dataset or Path(args.prompts).stem,
        question_type=args.question_type,
    )
    finish_stage(
        Path(args.out).with_suffix(".jsonl"),
        stage="export",
        config=vars(args),
        counts=counts,
        started=started,
        inputs={"pairs": args.pairs, "prompts": args.prompts},
        fingerprint=export_fingerprint(
            args.pairs,
            prompts,
            {k: getattr(args, k) for k in ("ds_name", "origin_dataset", "question_type")},
        ),
    )
    print(f"export: {counts['rows']} rows -> {args.out} ({counts['image_errors']} image errors)")


if __name__ == "__main__":
    main()
