"""Our LoRA forward on peft's ``Linear`` layers: the scaled low-rank product accumulated into the base output by the
GEMM itself, and the adapters computing in the model's half dtype (autocast) instead of casting inputs to float32."""

from __future__ import annotations

import types
from typing import Any

import torch


def set_lora_input_casting(model: torch.nn.Module, enabled: bool) -> None:
    """Switch peft's cast of each LoRA layer's input to the adapters' dtype on or off (peft's default: on)."""
    for m in model.modules():
        if hasattr(m, "lora_A"):
            m.cast_input_dtype_enabled = enabled


def lora_compute_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The dtype to autocast the LoRA layers to: the base weights' half dtype when their input cast to the float32
    adapters is off (``set_lora_input_casting(model, False)``), else None (nothing to autocast)."""
    for m in model.modules():
        if hasattr(m, "lora_A") and hasattr(m, "base_layer"):
            dtype = m.base_layer.weight.dtype
            if not getattr(m, "cast_input_dtype_enabled", True) and dtype in (torch.bfloat16, torch.float16):
                return dtype
            return None
    return None


def _fused_lora_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft's LoRA ``Linear`` forward, ``base(x) + B(A(dropout(x))) * scaling``, as ``addmm(base(x), h, (s B)^T)``:
    the GEMM accumulates the scaled low-rank product into the base output, instead of two elementwise passes
    (``* scaling``, ``+``) over the (tokens x out_features) output in the forward, the recomputation and the
    backward. Anything else (several or disabled adapters, DoRA and other variants, a LoRA bias, merged weights,
    ZeRO-3 partitioned weights, mixed dtypes outside autocast, extra arguments) takes peft's own forward."""
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
