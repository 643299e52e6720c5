"""Torn-proof training checkpoints: written into a staging folder and renamed, and found complete on resume.

A kill at any moment leaves the previous complete ``checkpoint-N`` or the new complete one: the Trainer writes
everything (weights, optimizer, scheduler, RNG, ``trainer_state.json``) into ``.tmp-checkpoint-N/checkpoint-N``,
which is renamed to ``checkpoint-N`` only when every rank has finished. Resuming takes the newest checkpoint whose
files are all there and warns about each one it skips (left by a crash under older code, or a copy cut short).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PREFIX = "checkpoint"
STAGING = ".tmp-"  # staging folders: not matched by transformers' ^checkpoint-(\d+)$ nor by its rotation glob
REPLACED = ".replaced-"
TRAINER_STATE = "trainer_state.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors", "adapter_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_atomically(trainer: Any, save: Callable[[Any, Any], None], model: Any, trial: Any) -> None:
    """Run the Trainer's ``_save_checkpoint`` (``save``) into a staging folder, then rename it into place.

    Every rank calls this (the Trainer saves on every rank: RNG states, DeepSpeed shards); the process that
    saves (``args.should_save``) renames after all ranks have written, and then rotates old checkpoints.
    """
    from transformers.trainer_utils import rotate_checkpoints

    run_dir = Path(trainer._get_output_dir(trial=trial))
    name = f"{PREFIX}-{trainer.state.global_step}"
    staging_root = run_dir / f"{STAGING}{name}"
    if trainer.args.should_save and staging_root.exists():
        shutil.rmtree(staging_root)  # left by a run killed while saving this step
    trainer.accelerator.wait_for_everyone()
    trainer._get_output_dir = lambda trial=None: str(staging_root)  # the Trainer builds <run_dir>/<name> from it
    try:
        save(model, trial)
    finally:
        del trainer._get_output_dir  # the class's method again
    trainer.accelerator.wait_for_everyone()
    if trainer.args.should_save:
        staged, final = staging_root / name, run_dir / name
        best = trainer.state.best_model_checkpoint
        if best and Path(best).parent == staging_root:  # the new checkpoint is the best: name its final place
            trainer.state.best_model_checkpoint = str(final)
            trainer.state.save_to_json(str(staged / TRAINER_STATE))
        _fsync_dir(staged)
        replaced = run_dir / f"{REPLACED}{name}"
        if final.exists():  # the same step saved again (a resumed run): keep the old one until the new is in place
            shutil.rmtree(replaced, ignore_errors=True)
            os.replace(final, replaced)
        os.replace(staged, final)
        _fsync_dir(run_dir)
        shutil.rmtree(replaced, ignore_errors=True)
        shutil.rmtree(staging_root, ignore_errors=True)
        rotate_checkpoints(
            output_dir=str(run_dir),
            save_total_limit=trainer.args.save_total_limit,
            best_model_checkpoint=trainer.state.best_model_checkpoint,
            use_mtime=True,
        )
    trainer.accelerator.wait_for_everyone()


def missing_files(path: str | Path, *, needs_optimizer: bool = True) -> list[str]:
    """What a checkpoint folder lacks to be resumed from (empty when complete).

    Complete: a readable ``trainer_state.json`` with its ``global_step``; the weights (one file, or an index and
    every shard it lists); ``rlaifv_checkpoint.json`` (our saver writes it after the weights); and, unless the run
    saves only the model, the optimizer and scheduler (``optimizer.pt`` + ``scheduler.pt``, or DeepSpeed's
    ``latest`` tag).
    """
    path = Path(path)
    missing: list[str] = []
    try:
        state = json.loads((path / TRAINER_STATE).read_text())
        if "global_step" not in state:
            missing.append(f"{TRAINER_STATE} (no global_step)")
    except FileNotFoundError:
        missing.append(TRAINER_STATE)
    except (OSError, ValueError):
        missing.append(f"{TRAINER_STATE} (unreadable)")
    index = next((path / f for f in INDEX_FILES if (path / f).is_file()), None)
    if index is not None:
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
            missing.extend(sorted(s for s in shards if not (path / s).is_file()))
        except (OSError, ValueError, KeyError):
            missing.append(f"{index.name} (unreadable)")
    elif not any((path / f).is_file() for f in WEIGHT_FILES):
        missing.append("weights (" + " | ".join(WEIGHT_FILES) + ")")
    if not (path / "rlaifv_checkpoint.json").is_file():
        missing.append("rlaifv_checkpoint.json")
    if needs_optimizer and not (path / "latest").is_file():
        missing.extend(f for f in ("optimizer.pt", "scheduler.pt") if not (path / f).is_file())
    return missing


def checkpoints(output_dir: str | Path) -> list[Path]:
    """``checkpoint-N`` folders of ``output_dir``, newest step first."""
    found = []
    for p in Path(output_dir).iterdir() if Path(output_dir).is_dir() else []:
        m = re.fullmatch(rf"{PREFIX}-(\d+)", p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found, reverse=True)]


def last_complete_checkpoint(output_dir: str | Path, *, needs_optimizer: bool = True) -> Path | None:
    """The newest complete checkpoint in ``output_dir``; each newer incomplete one is skipped with a warning."""
    _recover_replaced(Path(output_dir))
    for ckpt in checkpoints(output_dir):
        missing = missing_files(ckpt, needs_optimizer=needs_optimizer)
        if not missing:
            return ckpt
        logger.warning(
            "skipping incomplete checkpoint %s (missing: %s); it was cut short by a crash. Resuming from an older "
            "one; delete it to silence this warning",
            ckpt,
            ", ".join(missing),
        )
    return None


def _recover_replaced(output_dir: Path) -> None:
    """A kill between the two renames of a re-saved step leaves only ``.replaced-checkpoint-N``: put it back."""
    if not output_dir.is_dir():
        return
    for p in output_dir.glob(f"{REPLACED}{PREFIX}-*"):
        final = output_dir / p.name[len(REPLACED) :]
        if final.exists():
            shutil.rmtree(p, ignore_errors=True)
        else:
            os.replace(p, final)
            logger.warning("restored %s from %s (a save of that step was cut short)", final, p)
