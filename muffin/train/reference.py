"""Reference log-probs stage: the frozen initial model scores every pair once; training reads the cache.

The pairs of one prompt (wherever they sit in the data) are scored together: its image and question are encoded once and
each distinct answer once, which gives the numbers of scoring each pair on its own (``encode_by_prompt``).

    python -m muffin.train.reference --model_path ckpt/llava-1.5-7b --data data/RLAIF-V-Dataset
    torchrun --nproc_per_node 8 -m muffin.train.reference --model_path ... --data ...   # sharded, same output

Output (default ``<data>.logps/`` next to the data): ``logps.parquet`` with one row per pair in data order and the
columns ``idx`` and ``logps`` (a JSON list as the original RLAIF-V writes it: chosen sum, chosen mean, chosen
per-token, rejected sum, rejected mean, rejected per-token), and ``fingerprint.json`` (model weights hash, data hash,
template, preprocessing, max length). A cache whose fingerprint differs is refused, naming the part that differs.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from muffin.family import TRUST_REMOTE_CODE_HELP, ModelFamily, Sample
from muffin.fast.compiled_layers import planned_compile
from muffin.fast.layout import plan_batch_logps
from muffin.fast.logps import reduce_logps
from muffin.fast.packing import supports_packing
from muffin.inference import on_accelerator, prefetched
from muffin.train.data import PreferenceDataset, truncate_batch
from muffin.train.policy import concatenated_logps
from muffin.train.reference_cache import (
    default_logps_dir,
    fingerprint_mismatch,
    load_reference_logps,
    make_fingerprint,
    merge_parts,
)
from utils import dist
from utils.io import JsonlWriter, atomic_write_json

logger = logging.getLogger(__name__)

LOADER_TIMEOUT_S = 600  # seconds a forked loader process may take for one batch before the stage raises


# ---------------------------------------------------------------------- scoring
def prompt_batches(keys: list[str], batch_size: int) -> list[list[int]]:
    """Positions of consecutive items in batches of at least ``batch_size`` pairs that never split a run of equal
    prompt keys (a prompt's pairs sit next to each other in pair files: the pipeline and the original write them
    so), each batch ending where its last prompt's run ends; the last batch may be smaller.

    Example:
        >>> prompt_batches(["a", "a", "b", "b", "b", "c"], 2)
        [[0, 1], [2, 3, 4], [5]]
    """
    out: list[list[int]] = []
    for pos, key in enumerate(keys):
        if not out or (len(out[-1]) >= batch_size and key != keys[pos - 1]):
            out.append([])
        out[-1].append(pos)
    return out


def rows_by_prompt(keys: list[str]) -> list[int]:
    """Row indices with each prompt's rows together: prompts in order of first appearance, rows in order within,
    so that pairs of one prompt meet in one batch whatever the order of the data.

    Example:
        >>> rows_by_prompt(["a", "b", "a", "c", "b"])
        [0, 2, 1, 4, 3]
    """
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return [i for rows in groups.values() for i in rows]


@dataclass
class PromptBatch:
    """The pairs of a reference batch grouped by prompt, each distinct answer encoded once (see ``score_rows``)."""

    rows: list[int]  # the dataset rows of the pairs
    batch: dict[str, Any]  # encode + truncation of the distinct (image, question, answer) samples, group by group
    answer_rows: list[tuple[int, int]]  # each pair's (chosen, rejected) rows in ``batch``
    plan: Any = None  # the packed path's plan (``plan_batch_logps``) with one group per prompt


def encode_by_prompt(
    family: ModelFamily, records: list[dict[str, Any]], keys: list[str], max_length: int
) -> PromptBatch:
    """Encode a batch of pair records with each prompt's distinct answers once: pairs with equal keys share their
    image (the first record's image object, preprocessed once) and question, and an answer that two pairs of a
    prompt share (RLAIF-V samples two pairs per prompt from its ten answers) is one row. On the packed path each
    prompt is one group: the image and the prompt are encoded once for all of its answers."""
    groups: dict[str, list[tuple[Sample, Any]]] = {}  # prompt key -> its distinct answers (sample, record idx)
    seen: dict[str, dict[str, int]] = {}
    local: list[tuple[str, int, int]] = []
    for rec, key in zip(records, keys):
        samples, index = groups.setdefault(key, []), seen.setdefault(key, {})
        ends = []
        for text in (rec["chosen"], rec["rejected"]):
            if text not in index:
                index[text] = len(samples)
                image = samples[0][0].image if samples else rec["image"]
                samples.append((Sample(image, rec["question"], text), rec["idx"]))
            ends.append(index[text])
        local.append((key, ends[0], ends[1]))
    offset, flat = {}, []
    for key, samples in groups.items():
        offset[key] = len(flat)
        flat += samples
    batch = truncate_batch(family.encode([s for s, _ in flat]), max_length, [i for _, i in flat])
    answer_rows = [(offset[k] + c, offset[k] + r) for k, c, r in local]
    plan = None
    if supports_packing(family):
        prompt_groups = [list(range(offset[k], offset[k] + len(g))) for k, g in groups.items()]
        plan = plan_batch_logps(family, batch, prompt_groups)
    return PromptBatch([rec["row"] for rec in records], batch, answer_rows, plan)


class _PromptBatches(torch.utils.data.Dataset):
    """Batch k of ``score_rows``: its records read and encoded by prompt (run in DataLoader worker processes)."""

    def __init__(self, family, dataset, rows, keys, batches, max_length) -> None:
        self.family, self.dataset, self.rows, self.keys = family, dataset, rows, keys
        self.batches, self.max_length = batches, max_length

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> PromptBatch:
        positions = self.batches[k]
        records = [self.dataset[self.rows[p]] for p in positions]
        return encode_by_prompt(self.family, records, [self.keys[p] for p in positions], self.max_length)


def _first(items: list[Any]) -> Any:
    return items[0]


def score_rows(
    family: ModelFamily, dataset: PreferenceDataset, rows: list[int], **kwargs: Any
) -> list[tuple[int, list[Any]]]:
    """``(row, logps)`` for each row: ``iter_scores`` (same arguments) as a list."""
    return list(iter_scores(family, dataset, rows, **kwargs))


def iter_scores(
    family: ModelFamily,
    dataset: PreferenceDataset,
    rows: list[int],
    *,
    max_length: int,
    batch_size: int = 8,
    num_workers: int = 0,
    progress: bool = False,
    keys: list[str] | None = None,
) -> Iterator[tuple[int, list[Any]]]:
    """``(row, logps)`` for each row, batch by batch: the model's log-probs of chosen and rejected, encoded as in
    training.

    Batches of about ``batch_size`` pairs keep a prompt's neighbouring pairs together; within a batch each prompt's
    image and question are encoded once and each distinct answer scored once (``encode_by_prompt``), the same
    numbers as scoring every pair on its own (``tests/test_train_reference.py``). The CPU side of the batches
    (reading, image preprocessing, tokenising, packing) runs one batch ahead in a thread on an accelerator, inline
    on the CPU (the default, ``num_workers=0``), or ahead in ``num_workers`` forked loader processes (Linux; not yet
    timed on a GPU; a worker that hangs raises after ``LOADER_TIMEOUT_S``). Each batch's log-probs are copied back
    and read while the next batch runs on the GPU, so the host never makes the GPU wait.
    """
    keys = [dataset.prompt_key(i) for i in rows] if keys is None else keys
    batches = prompt_batches(keys, batch_size)
    source = _PromptBatches(family, dataset, rows, keys, batches, max_length)
    if num_workers > 0 and len(batches) > 1:
        import multiprocessing
        import os

        if "fork" not in multiprocessing.get_all_start_methods():
            raise ValueError(
                f"num_workers={num_workers} needs forked loader processes, which this platform lacks; "
                "pass --num_workers 0 (batches prepared one ahead in a thread)"
            )

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers are forked from this process
        loaded = iter(
            torch.utils.data.DataLoader(
                source,
                batch_size=1,
                collate_fn=_first,
                num_workers=min(num_workers, len(batches)),
                multiprocessing_context="fork",
                prefetch_factor=2,
                timeout=LOADER_TIMEOUT_S,
            )
        )
    else:
        loaded = prefetched(source.__getitem__, range(len(batches)), background=on_accelerator(family))
    pending = None
    try:
        for pb in tqdm(loaded, total=len(batches), desc="reference logps", disable=not progress):
            with torch.inference_mode():
                logps, mask = concatenated_logps(family, pb.batch, packed=pb.plan is not None, plan=pb.plan)
                host = _queue_to_host(logps, mask)
            if pending is not None:  # the previous batch is read while this one runs on the GPU
                yield from _batch_scores(*pending, max_length)
            pending = (pb, host)
    except Exception:
        if pending is not None:  # the next batch failed (loading or scoring): the finished one still counts
            yield from _batch_scores(*pending, max_length)
        raise
    if pending is not None:
        yield from _batch_scores(*pending, max_length)


def _queue_to_host(*tensors: torch.Tensor) -> tuple[list[torch.Tensor], Any]:
    """Copies of GPU tensors to (pinned) host memory, queued behind the kernels that make them, and an event that
    fires when they have landed (None off the GPU, where the copies are done on return)."""
    if tensors[0].device.type != "cuda":
        return [t.cpu() for t in tensors], None
    host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True) for t in tensors]
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(tensors[0].device))  # the copies' stream, whichever device is current
    return host, done


def _batch_scores(pb: Any, host: tuple[list[torch.Tensor], Any], max_length: int) -> Iterator[tuple[int, list[Any]]]:
    (logps, mask), done = host
    if done is not None:
        done.synchronize()
    total, mean = reduce_logps(logps, mask)
    for row, (c, r) in zip(pb.rows, pb.answer_rows):
        yield (
            row,
            [
                float(total[c]),
                float(mean[c]),
                logps[c][mask[c]].tolist(),
                float(total[r]),
                float(mean[r]),
                logps[r][mask[r]].tolist(),
            ],
        )
    trunc = pb.batch["truncated"]
    if trunc.any():
        logger.info("%d answers of this batch truncated at max_length=%d", int(trunc.sum()), max_length)


def prompt_keys(dataset: PreferenceDataset) -> list[str]:
    """``dataset.prompt_key(i)`` of every row. Each rank hashes every world-th row (the images' bytes are most of the
    work) and the shares are exchanged, so the pass takes 1/world of the time it takes one process."""
    r, w, n = dist.rank(), dist.world_size(), len(dataset)
    share = [
        dataset.prompt_key(i)
        for i in tqdm(range(r, n, w), desc="prompt keys", disable=not dist.is_main(), mininterval=5)
    ]
    parts = dist.all_gather_object(share)
    if len(parts) != w:
        raise RuntimeError(
            f"WORLD_SIZE={w} but {len(parts)} rank(s) exchanged prompt keys: torch.distributed is not initialised; "
            "launch with torchrun / accelerate / deepspeed, or unset WORLD_SIZE and RANK for one process"
        )
    keys: list[str] = [""] * n
    for rank, part in enumerate(parts):
        keys[rank::w] = part
    return keys


def build_reference_logps(
    family: ModelFamily,
    dataset: PreferenceDataset,
    logps_dir: str | Path,
    fingerprint: dict[str, Any],
    *,
    max_length: int,
    batch_size: int = 8,
    num_workers: int = 0,
    compile_layers: bool | str = "auto",
) -> Path:
    """Score this rank's shard (resumable per-rank JSONL), then rank 0 merges in data order and writes the cache.
    ``compile_layers``: ``muffin.fast.compiled_layers.for_planned_calls`` of this rank's batches."""
    logps_dir = Path(logps_dir)
    parts = logps_dir / "parts"
    rank, world = dist.rank(), dist.world_size()
    if dist.is_main():
        marker = parts / "fingerprint.json"
        if marker.is_file() and fingerprint_mismatch(json.loads(marker.read_text()), fingerprint):
            shutil.rmtree(parts)  # partial results of another model or data: start over
        parts.mkdir(parents=True, exist_ok=True)
        atomic_write_json(marker, fingerprint)
    dist.barrier()
    started = time.time()
    keys = prompt_keys(dataset)
    # a prompt's pairs together wherever they sit in the data, then contiguous blocks: they meet on one rank
    mine = dist.shard_blocks(rows_by_prompt(keys))
    with JsonlWriter(parts / f"rank{rank}-of-{world}.jsonl", key="row") as writer:
        todo = [i for i in mine if i not in writer.done]
        logger.info(
            "reference log-probs: %d pairs on rank %d (%d already done)", len(todo), rank, len(mine) - len(todo)
        )
        with planned_compile(family, compile_layers, calls=-(-len(todo) // max(1, batch_size))):
            for row, logps in iter_scores(  # each pair written as it is scored: a kill loses two batches at most
                family,
                dataset,
                todo,
                max_length=max_length,
                batch_size=batch_size,
                num_workers=num_workers,
                progress=dist.is_main(),
                keys=[keys[i] for i in todo],
            ):
                writer.write({"row": row, "idx": dataset.record_id(row), "logps": logps})
    dist.barrier()
    if dist.is_main():
        merge_parts(dataset, logps_dir, fingerprint, world, started)
    dist.barrier()
    return logps_dir


def ensure_reference_logps(
    family: ModelFamily,
    dataset: PreferenceDataset,
    *,
    model_path: str | Path,
    max_length: int,
    logps_dir: str | Path | None = None,
    batch_size: int = 8,
    lora_path: str | Path | None = None,
    overwrite: bool = False,
    num_workers: int = 0,
    compile_layers: bool | str = "auto",
) -> Path:
    """Attach reference log-probs to ``dataset``: reuse a matching cache, refuse a mismatching one, else compute.

    Call it with the initial (untrained) model on every rank; the work is sharded over the ranks. ``compile_layers``
    (auto / True / False): whether the packed decoder layers run compiled; "auto" leaves a short stage eager.
    """
    logps_dir = Path(logps_dir) if logps_dir else default_logps_dir(dataset)
    fingerprint = dist.broadcast_object(
        make_fingerprint(family, model_path=model_path, dataset=dataset, max_length=max_length, lora_path=lora_path)
        if dist.is_main()
        else None
    )
    if overwrite and dist.is_main() and (logps_dir / "fingerprint.json").is_file():
        (logps_dir / "fingerprint.json").unlink()
    dist.barrier()
    if not (logps_dir / "fingerprint.json").is_file():
        logger.info("no reference log-probs in %s: computing them with %s", logps_dir, model_path)
        was_training = family.model.training
        family.model.eval()
        build_reference_logps(
            family,
            dataset,
            logps_dir,
            fingerprint,
            max_length=max_length,
            batch_size=batch_size,
            num_workers=num_workers,
            compile_layers=compile_layers,
        )
        family.model.train(was_training)
    else:
        logger.info("reusing reference log-probs from %s", logps_dir)
    dataset.attach_logps(load_reference_logps(logps_dir, fingerprint))
    return logps_dir


# ---------------------------------------------------------------------- CLI
def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Compute (or check) the reference log-probs cache of a preference dataset."
    )
    p.add_argument("--model_path", "--model-path", required=True, help="initial policy = reference model directory")
    p.add_argument("--data", required=True, help="parquet dir/file, pair JSONL, or hub dataset id")
    p.add_argument("--data_split", "--data-split", default="train", help="split of a hub dataset")
    p.add_argument("--image_root", "--image-root", default=None, help="root of relative image paths")
    p.add_argument("--logps_dir", "--logps-dir", default=None, help="cache directory (default <data>.logps)")
    p.add_argument("--family", default=None, help="force a model family")
    p.add_argument("--trust_remote_code", "--trust-remote-code", action="store_true", help=TRUST_REMOTE_CODE_HELP)
    p.add_argument("--model_max_length", "--model-max-length", type=int, default=2048, help="truncation length")
    p.add_argument("--batch_size", "--batch-size", type=int, default=8, help="pairs per forward pass")
    p.add_argument(
        "--num_workers",
        "--num-workers",
        type=int,
        default=0,
        help="forked loader processes reading and encoding batches ahead (default 0: one batch ahead in a thread)",
    )
    p.add_argument("--dtype", default=None, help="bf16 / fp16 / fp32 (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--overwrite", action="store_true", help="recompute even if a cache exists")
    p.add_argument(
        "--compile_layers",
        "--compile-layers",
        type=str.lower,
        choices=["auto", "true", "false"],
        default="auto",
        help="run the packed decoder layers compiled: auto (on a GPU for a wide model, when the stage is long enough "
        "to repay the compilation), true, false",
    )
    return p


def main(argv: list[str] | None = None) -> None:
    args = make_parser().parse_args(argv)
    dist.setup_logging()
    device = dist.device_for_rank()
    if device.startswith("cuda"):
        torch.cuda.set_device(device)  # this rank's GPU is the current one (NCCL object collectives use it)
    if dist.world_size() > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    from muffin.family import load_family

    family = load_family(
        args.model_path,
        family=args.family,
        dtype=args.dtype,
        device=device,
        trust_remote_code=args.trust_remote_code,
    )
    dataset = PreferenceDataset(args.data, split=args.data_split, image_root=args.image_root)
    out = ensure_reference_logps(
        family,
        dataset,
        model_path=args.model_path,
        max_length=args.model_max_length,
        logps_dir=args.logps_dir,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
        num_workers=args.num_workers,
        compile_layers=args.compile_layers,
    )
    if dist.is_main():
        print(out)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
