"""``DPOTrainer``: a ``transformers.Trainer`` that trains any model family on preference pairs with cached references.

The policy runs only through the family interface (``muffin.train.policy``); the reference log-probs come from the
cache of ``muffin.train.reference`` (no reference model in memory). Full fine-tuning and LoRA share this trainer
(``prepare_model``); a LoRA checkpoint loads with ``muffin.load_family(base, lora_path=ckpt)`` (``save_checkpoint``).
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType
from transformers import PreTrainedModel, Trainer

from muffin.family import LayeredModel, ModelFamily
from muffin.fast.dropout import use_seeded_dropout
from muffin.fast.packing import supports_packing
from muffin.train.args import DPOConfig
from muffin.train.data import PairCollator, PreferenceDataset
from muffin.train.loss import preference_loss, sequence_logps
from muffin.train.peft_patch import lora_compute_dtype, set_lora_fusion, set_lora_input_casting
from muffin.train.policy import concatenated_logps
from utils.cuda import to_device

logger = logging.getLogger(__name__)

NON_LORA_FILE = "non_lora_trainables.safetensors"
CHECKPOINT_INFO = "rlaifv_checkpoint.json"


def prepare_model(family: ModelFamily, args: DPOConfig) -> Any:
    """Set what trains: LoRA on ``lora_target_modules`` + ``trainable_modules`` fully, or every weight; the
    ``frozen_modules`` (vision tower) stay frozen unless ``--freeze_vision False``.

    Returns the ``PeftModel`` wrapping ``family.model`` with LoRA (its layers are injected into ``family.model`` in
    place, so ``family.forward`` runs the adapters), else ``family.model``.
    """
    model = family.model
    frozen = tuple(p + "." for p in family.frozen_modules()) if args.freeze_vision else ()
    if args.use_lora:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            target_modules=family.lora_target_modules(),
            bias="none",
        )
        wrapped = get_peft_model(model, config)  # freezes every non-LoRA weight
        base_dtype = next(p.dtype for n, p in model.named_parameters() if "lora_" not in n)
        if base_dtype in (torch.bfloat16, torch.float16):
            # peft keeps the adapters in float32 and casts every LoRA layer's input to float32: a float32 copy of each
            # activation and float32 GEMMs (docs/PERFORMANCE.md). The adapters stay float32 (the optimizer's
            # weights) but compute in the model's dtype under autocast (``lora_compute_dtype``, which the trainer
            # passes to ``concatenated_logps``).
            set_lora_input_casting(model, False)
        set_lora_fusion(model, True)
        use_seeded_dropout(
            model
        )  # LoRA dropout that compiled, checkpointed layers can recompute (muffin.fast.dropout)
        full = tuple(p + "." for p in family.trainable_modules())
        if not args.freeze_vision:
            full += tuple(p + "." for p in family.frozen_modules())
        for name, p in model.named_parameters():
            if name.startswith(full):
                p.requires_grad_(True)
    else:
        wrapped = model
        for name, p in model.named_parameters():
            p.requires_grad_(not name.startswith(frozen))
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    logger.info(
        "%s: training %d of %d parameters (%.2f%%)",
        "LoRA" if args.use_lora else "full fine-tuning",
        n_train,
        n_all,
        100 * n_train / max(n_all, 1),
    )
    return wrapped


class DPOTrainer(Trainer):
    """DPO on preference pairs through a ``ModelFamily``.

    Args:
        family: the loaded family; ``prepare_model(family, args)`` must have run (its result is ``model``).
        args: the ``DPOConfig``.
        train_dataset: a ``PreferenceDataset`` with reference log-probs attached (``ensure_reference_logps``).
        model: what ``prepare_model`` returned (a ``PeftModel`` with LoRA, else ``family.model``).

    Example:
        >>> peft_or_model = prepare_model(family, args)                                # doctest: +SKIP
        >>> DPOTrainer(family, args, dataset, model=peft_or_model).train()             # doctest: +SKIP
    """

    def __init__(
        self,
        family: ModelFamily,
        args: DPOConfig,
        train_dataset: PreferenceDataset,
        *,
        model: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        if train_dataset.ref_logps is None:
            raise ValueError(
                f"training data '{train_dataset.source}' has no reference log-probs; call "
                "muffin.train.reference.ensure_reference_logps(family, dataset, ...) first"
            )
        self.family = family
        self.is_lora = args.use_lora
        if args.checkpoint_layers >= 0 and not _checkpointing_on(args):
            logger.warning(
                "--checkpoint_layers %d has no effect without --gradient_checkpointing", args.checkpoint_layers
            )
        if args.checkpoint_layers >= 0 and not isinstance(family, LayeredModel):
            raise ValueError(
                f"--checkpoint_layers {args.checkpoint_layers}: the {type(family).__name__} family does not list its "
                "decoder layers (LLaVA does); drop the flag to checkpoint every layer"
            )
        super().__init__(
            model=model if model is not None else family.model,
            args=args,
            train_dataset=train_dataset,
            **kwargs,
        )
        # the one decision to pack (the family's fast path, --packing, the launcher); the collator plans only then
        self.packed = args.packing and supports_packing(family) and self._launcher_allows_packing()
        self.data_collator = PairCollator(
            family, max_length=args.model_max_length, ddpo_gamma=args.ddpo_gamma, packing=self.packed
        )
        self.compute_dtype = lora_compute_dtype(self.model)  # float32 adapters computing in the model's half dtype
        # our loss is a per-batch mean: let the Trainer divide it by the gradient-accumulation steps
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self._metric_keys: list[str] = []
        self._metric_sum: torch.Tensor | None = None  # per-metric sums over the steps since the last log, on device
        self._metric_steps = 0

    # ------------------------------------------------------------------ loss
    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Leave the batch on the host. The model side copies what it reads asynchronously
        (``utils.cuda.to_device``) and reads its layout (image places, row lengths) from the host copies; the
        Trainer's own blocking ``.to(device)`` would stop the host until the GPU had finished the previous step."""
        if not inputs:
            raise ValueError("the data loader gave an empty batch; check the training data file")
        return inputs

    def _limit_checkpointing(self) -> None:
        """``--checkpoint_layers N``: layers from the N-th on skip gradient checkpointing (set before every step, so
        it holds whenever the Trainer turns checkpointing on)."""
        n = self.args.checkpoint_layers
        if n < 0 or not _checkpointing_on(self.args):
            return
        for i, layer in enumerate(self.family.decoder_layers()):
            if i >= n:
                layer.gradient_checkpointing = False

    def _launcher_allows_packing(self) -> bool:
        """False under plain DDP, DataParallel or ZeRO-3: they need every parameter use to go through the wrapper's
        forward, and the packed path calls submodules directly (DataParallel's replicas would also share the
        compiled layers' per-call state across threads). The wrapper comes later (``accelerator.prepare``): this
        reads what it will be from the launcher's state, as accelerate and the Trainer do."""
        acc = self.accelerator
        if acc.multi_device or acc.distributed_type == DistributedType.MULTI_CPU:  # wrapped in DDP
            return False
        if self.args.n_gpu > 1:  # wrapped in DataParallel
            return False
        ds = getattr(acc.state, "deepspeed_plugin", None)
        return not (ds is not None and ds.zero_stage == 3)

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        args: DPOConfig = self.args
        self._limit_checkpointing()
        if self.packed and isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            raise RuntimeError(
                f"the model runs under {type(model).__name__}, which the packed path bypasses; "
                "train with --packing False"
            )
        per_token, mask = concatenated_logps(  # (2B, T-1)
            self.family,
            inputs,
            packed=self.packed,
            model=None if model is self.family.model else model,
            compute_dtype=self.compute_dtype,
        )
        dev = per_token.device
        weights = to_device(inputs["token_weights"], dev) if "token_weights" in inputs else None
        policy = sequence_logps(per_token, mask, weights, average=args.use_average)  # (2B,)
        ref = sequence_logps(to_device(inputs["ref_per_token"], dev), mask, weights, average=args.use_average)
        n = policy.shape[0] // 2
        out = preference_loss(
            policy[:n],
            policy[n:],
            ref[:n],
            ref[n:],
            beta=args.beta,
            loss_type=args.loss_type,
            label_smoothing=args.label_smoothing,
            sft_weight=args.sft_weight,
        )
        self._store_metrics(out, policy.detach(), ref, to_device(inputs["truncated"], dev))
        if return_outputs:
            return out.loss, {"policy_logps": policy.detach(), "reference_logps": ref}
        return out.loss

    def _store_metrics(self, out: Any, policy: torch.Tensor, ref: torch.Tensor, truncated: torch.Tensor) -> None:
        """Add this step's metrics, gathered over ranks in one collective, to running sums kept on the device:
        reading them here (``.item()``) would stop the host between the forward and the backward; ``log`` reads
        them at once."""
        n = policy.shape[0] // 2
        values = {
            "rewards/chosen": out.chosen_rewards,
            "rewards/rejected": out.rejected_rewards,
            "rewards/margins": out.chosen_rewards - out.rejected_rewards,
            "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float(),
            "logps/chosen": policy[:n],
            "logps/rejected": policy[n:],
            "logps/ref_chosen": ref[:n],
            "logps/ref_rejected": ref[n:],
            "loss/preference": out.losses.detach(),
            "loss/sft": out.sft.reshape(1),
        }
        # per-rank means (ranks hold equal batches) and the truncation count, then means / the sum over ranks
        row = torch.stack([v.detach().float().mean() for v in values.values()] + [truncated.float().sum()])
        ranks = self.accelerator.gather(row[None]).reshape(-1, row.numel())
        self._metric_keys = [*values, "data/truncated_answers"]
        step = torch.cat([ranks[:, :-1].mean(0), ranks[:, -1:].sum(0)])
        self._metric_sum = step if self._metric_sum is None else self._metric_sum + step
        self._metric_steps += 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the means since the last log of rewards, log-probs and loss terms (sum for truncation counts)."""
        if self._metric_sum is not None:
            sums = self._metric_sum.cpu()  # the one device read per log
            for j, key in enumerate(self._metric_keys):
                logs[key] = float(sums[j] if key.startswith("data/") else sums[j] / self._metric_steps)
            self._metric_sum, self._metric_steps = None, 0
        super().log(logs, start_time)

    # ------------------------------------------------------------------ checkpoints
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Full weights via ``family.save_pretrained``, or the LoRA layout; gathers ZeRO-3 shards first."""
        out = Path(output_dir or self.args.output_dir)
        params = [p for p in self.family.model.parameters() if p.requires_grad or not self.is_lora]
        with _gathered(params):
            if self.args.should_save:
                save_checkpoint(
                    self.family,
                    out,
                    lora_model=self.model if self.is_lora else None,
                    base_model=self.args.model_path,
                    step=self.state.global_step,
                )
                torch.save(self.args, out / "training_args.bin")

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        """The Trainer's checkpoint, written into a staging folder and renamed: a kill never leaves a torn one."""
        from muffin.train.checkpoints import save_atomically

        save_atomically(self, super()._save_checkpoint, model, trial)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        """Restore the weights of a checkpoint this trainer wrote (DeepSpeed resumes from its own files instead)."""
        if self.is_lora:
            load_lora_weights(self.family, self.model, Path(resume_from_checkpoint))
            return
        inner = self.family.model
        if not isinstance(inner, PreTrainedModel):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        # save_pretrained may write converted key names (transformers 5 writes LLaVA's legacy layout): load
        # through the model class, which maps them back, then copy the weights in
        dtype = next(inner.parameters()).dtype
        loaded = type(inner).from_pretrained(resume_from_checkpoint, dtype=dtype)
        inner.load_state_dict(loaded.state_dict())
        logger.info("restored full weights from %s", resume_from_checkpoint)


def _checkpointing_on(args: DPOConfig) -> bool:
    """Whether the Trainer turns gradient checkpointing on (``activation_checkpointing`` from transformers 5.24)."""
    return bool(getattr(args, "activation_checkpointing", None) or args.gradient_checkpointing)


def _gathered(params: list[torch.nn.Parameter]) -> Any:
    """ZeRO-3 partitions parameters: gather them (a collective, on every rank) while saving."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def save_checkpoint(
    family: ModelFamily,
    path: str | Path,
    *,
    lora_model: Any = None,
    base_model: str | None = None,
    step: int | None = None,
) -> None:
    """Write a checkpoint that evaluators load directly.

    Full: ``family.save_pretrained(path)``. LoRA: ``adapter_config.json`` + ``adapter_model.safetensors`` (peft's
    layout, keys ``base_model.model.<param>.lora_A.weight``) + ``non_lora_trainables.safetensors`` (the trained
    non-LoRA weights, e.g. the projector, keyed as in ``family.model.state_dict()``); load with
    ``muffin.load_family(base_model, lora_path=path)``. Both also get ``rlaifv_checkpoint.json`` (kind, base, step).
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if lora_model is None:
        family.save_pretrained(path)
    else:
        lora_model.save_pretrained(str(path))
        extra = {
            n: p.detach().cpu().contiguous()
            for n, p in family.model.named_parameters()
            if p.requires_grad and "lora_" not in n
        }
        save_file(extra, str(path / NON_LORA_FILE), metadata={"format": "pt"})
    info = {
        "kind": "lora" if lora_model is not None else "full",
        "base_model": base_model,
        "family": family.name,
        "step": step,
    }
    (path / CHECKPOINT_INFO).write_text(json.dumps(info, indent=2) + "\n")


def load_lora_weights(family: ModelFamily, lora_model: Any, path: Path) -> None:
    """Restore a LoRA checkpoint of ``save_checkpoint`` into a prepared (LoRA-wrapped) model, for resuming."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    adapter_file = path / "adapter_model.safetensors"
    if not adapter_file.is_file():
        raise FileNotFoundError(
            f"cannot resume from '{path}': no adapter_model.safetensors (is it a full-weights "
            "checkpoint? then drop --use_lora)"
        )
    result = set_peft_model_state_dict(lora_model, load_file(str(adapter_file)))
    if getattr(result, "unexpected_keys", None):
        raise KeyError(f"{adapter_file}: adapter weights not in this model: {sorted(result.unexpected_keys)[:5]}")
    extra_file = path / NON_LORA_FILE
    if extra_file.is_file():
        _, unexpected = family.model.load_state_dict(load_file(str(extra_file)), strict=False)
        if unexpected:
            raise KeyError(f"{extra_file}: weights not in this model: {sorted(unexpected)[:5]}")
    logger.info("restored LoRA adapter and trained non-LoRA weights from %s", path)
