"""``DPOTrainer``: a ``transformers.Trainer`` that trains any model family on preference pairs with cached references.

The policy is run only through the family interface (``family.encode`` in the collator, ``family.forward`` here);
the reference log-probs come from the cache that ``muffin.train.reference`` writes, so no reference model is held
in memory. Full fine-tuning and LoRA share this one trainer (``prepare_model``); checkpoints are full weights via
``family.save_pretrained`` or, for LoRA, ``adapter_config.json`` + ``adapter_model.safetensors`` +
``non_lora_trainables.safetensors`` of that step, which ``muffin.load_family(base, lora_path=ckpt)`` merges.
"""

from __future__ import annotations

import contextlib
import json
import logging
import types
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, Trainer

from muffin.family import ModelFamily
from muffin.fast.dropout import use_seeded_dropout
from muffin.fast.layout import LogpsPlan, plan_batch_logps
from muffin.fast.logps import token_logps
from muffin.fast.packing import run_batch_logps, supports_packing
from muffin.train.args import DPOConfig
from muffin.train.data import PairCollator, PreferenceDataset, pair_groups
from muffin.train.loss import preference_loss, sequence_logps
from utils.cuda import to_device

logger = logging.getLogger(__name__)

NON_LORA_FILE = "non_lora_trainables.safetensors"
CHECKPOINT_INFO = "rlaifv_checkpoint.json"


def concatenated_logps(
    family: ModelFamily, batch: dict[str, Any], packed: bool | None = None, plan: LogpsPlan | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of a pair batch (chosen rows, then rejected rows) under the family's current model.

    The one place that runs the policy on a batch. By default (``packed=None``) a family that supports it takes the
    shared-prefix fast path of ``muffin.fast.packing``: each pair's image and prompt are encoded once and both answers
    attend to them, with log-probs computed without full-vocabulary float32 logits. ``packed=False`` runs chosen and
    rejected as two separate sequences (the original's way). Both give the same numbers (tests/test_packing.py).
    ``plan``: the packed path's CPU work done ahead (``plan_batch_logps(family, batch, pair_groups(batch))``);
    by default the batch's ``packing_plan`` (``PairCollator`` makes it), else made here.

    Returns:
        logps (2B, T-1) float32, zero off the answer; mask (2B, T-1) bool; aligned with ``input_ids[:, 1:]``.
    """
    if packed is None:
        packed = supports_packing(family)
    with adapter_autocast(family):
        if packed:
            plan = plan or batch.get("packing_plan") or plan_batch_logps(family, batch, pair_groups(batch))
            return run_batch_logps(family, batch, plan)
        logits = family.forward(batch)  # (2B, T, V)
        return token_logps(
            logits, to_device(batch["input_ids"], logits.device), to_device(batch["answer_mask"], logits.device)
        )


def adapter_autocast(family: ModelFamily) -> contextlib.AbstractContextManager:
    """Autocast to the model's half dtype when ``prepare_model`` kept float32 LoRA weights on a half-precision model
    (``family.adapter_compute_dtype``); a no-op otherwise. Gradient checkpointing replays the autocast state."""
    dtype = getattr(family, "adapter_compute_dtype", None)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=next(family.model.parameters()).device.type, dtype=dtype)


def set_lora_input_casting(model: torch.nn.Module, enabled: bool) -> None:
    """Switch peft's cast of each LoRA layer's input to the adapters' dtype on or off (peft's default: on)."""
    for m in model.modules():
        if hasattr(m, "lora_A"):
            m.cast_input_dtype_enabled = enabled


def _fused_lora_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft's LoRA ``Linear`` forward, ``base(x) + B(A(dropout(x))) * scaling``, as ``addmm(base(x), h, (s B)^T)``:
    the scaled low-rank product is accumulated into the base output by the GEMM itself, instead of two
    elementwise passes (``* scaling``, ``+``) over the (tokens x out_features) output in the forward, the
    recomputation and the backward (with the interval block mask, a 7B LoRA DPO step on an H200 went from 1127 to
    1055 ms; docs/PERFORMANCE.md, run 4). Anything else (several or
    disabled adapters, DoRA and other variants, a LoRA bias, merged weights, ZeRO-3 partitioned weights, mixed
    dtypes outside autocast, extra arguments) takes peft's own forward."""
    name = self.active_adapters[0] if len(self.active_adapters) == 1 else None
    B = self.lora_B[name] if name in self.lora_B else None
    if (
        not getattr(self, "fused_lora", True)
        or args
        or kwargs
        or B is None
        or self.disable_adapters
        or self.merged
        or name in self.lora_variant
        or B.bias is not None
        or hasattr(B.weight, "ds_id")  # ZeRO-3: the weight is gathered by B's own forward hooks
        or not (
            torch.is_autocast_enabled(x.device.type)
            or x.dtype == self.lora_A[name].weight.dtype == B.weight.dtype == self.base_layer.weight.dtype
        )
    ):
        return type(self).forward(self, x, *args, **kwargs)
    A = self.lora_A[name]
    result = self.base_layer(x)
    h = A(self.lora_dropout[name](self._cast_input_dtype(x, A.weight.dtype)))
    w = B.weight * self.scaling[name]  # (out, r): scaling folded into the small matrix
    if torch.compiler.is_compiling():
        # in a compiled layer the add fuses into the kernel that reads the output next (rotary embedding, SiLU gate,
        # residual add), where addmm would copy the base output into its own output buffer first
        return result + h @ w.t()
    shape = result.shape
    return torch.addmm(result.reshape(-1, shape[-1]), h.reshape(-1, h.shape[-1]), w.t()).view(shape)


def set_lora_fusion(model: torch.nn.Module, enabled: bool) -> int:
    """Route peft's LoRA ``Linear`` layers of ``model`` through ``_fused_lora_forward`` (or back to peft's forward);
    returns the number of layers switched. Same numbers up to rounding (tests/test_train_trainer.py)."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    n = 0
    for m in model.modules():
        if type(m) is LoraLinear:
            if "forward" not in m.__dict__:
                m.forward = types.MethodType(_fused_lora_forward, m)
            m.fused_lora = enabled
            n += 1
    return n


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
            # activation and float32 GEMMs, a third of a 7B DPO step's GPU time on an H200 (profile_dpo). The
            # adapters stay float32 (the optimizer's weights) but compute in the model's dtype under autocast
            # (``adapter_autocast``, applied by ``concatenated_logps``).
            set_lora_input_casting(model, False)
            family.adapter_compute_dtype = base_dtype
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


class _CallThrough:
    """Stands in for ``family.model`` during a step: calls go to the launcher's wrapper (DDP / DeepSpeed engine,
    whose forward hooks sync gradients), attribute reads (device, dtype, config) to the plain model."""

    def __init__(self, wrapped: torch.nn.Module, inner: torch.nn.Module) -> None:
        self._wrapped, self._inner = wrapped, inner

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._wrapped(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


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
        if args.checkpoint_layers >= 0 and not hasattr(family, "decoder_layers"):
            raise ValueError(
                f"--checkpoint_layers {args.checkpoint_layers}: the {type(family).__name__} family does not list its "
                "decoder layers (LLaVA does); drop the flag to checkpoint every layer"
            )
        collator = PairCollator(family, max_length=args.model_max_length, ddpo_gamma=args.ddpo_gamma)
        super().__init__(
            model=model if model is not None else family.model,
            args=args,
            train_dataset=train_dataset,
            data_collator=collator,
            **kwargs,
        )
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

    @contextlib.contextmanager
    def _route_forward(self, model: torch.nn.Module) -> Any:
        inner = self.family.model
        if model is inner:
            yield
            return
        self.family.model = _CallThrough(model, inner)  # type: ignore[assignment]
        try:
            yield
        finally:
            self.family.model = inner

    def _packed(self, model: torch.nn.Module) -> bool:
        """Use the shared-prefix path unless switched off, unsupported, or under plain DDP / DataParallel / ZeRO-3:
        those need every parameter use to go through the wrapper's forward, and the packed path calls submodules
        directly (DataParallel's replicas would also share the compiled layers' per-call state across threads)."""
        if not (self.args.packing and supports_packing(self.family)):
            return False
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            return False
        ds = getattr(self.accelerator.state, "deepspeed_plugin", None)
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
        with self._route_forward(model):
            per_token, mask = concatenated_logps(self.family, inputs, packed=self._packed(model))  # (2B, T-1)
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
        "family": getattr(family, "name", type(family).__name__),
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
