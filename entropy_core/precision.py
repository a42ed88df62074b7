"""Numerical precision as an explicit choice: TF32 off, dtypes by name, autocast on or off.

Why it matters (DESIGN §2.1): differences of log-probs at η ≈ 1e-6 are pure noise under TF32, and
`torch.set_float32_matmul_precision('high')` silently turns TF32 back on after `allow_tf32 = False`.
Only an entry point calls `apply_global_precision`, once; library functions take `dtype=` instead.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
_MATMUL_PRECISIONS = ("highest", "high", "medium")


def str_to_dtype(name: str | torch.dtype) -> torch.dtype:
    """'fp32' / 'float32' / 'torch.float32' / a torch.dtype -> torch.dtype; unknown names raise ValueError."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[key]


@dataclass(frozen=True)
class PrecisionState:
    """What `apply_global_precision` set, readable without mixing torch's legacy and new TF32 APIs."""
    matmul_precision: str
    cuda_matmul: str      # 'ieee' = full fp32, 'tf32' = TF32 allowed
    cudnn_conv: str
    cudnn_rnn: str

    @property
    def tf32_enabled(self) -> bool:
        return "tf32" in (self.cuda_matmul, self.cudnn_conv, self.cudnn_rnn)


def current_precision() -> PrecisionState:
    """Read the process-wide float32 matmul settings through torch's fp32_precision API."""
    return PrecisionState(
        matmul_precision=torch.get_float32_matmul_precision(),
        cuda_matmul=torch.backends.cuda.matmul.fp32_precision,
        cudnn_conv=torch.backends.cudnn.conv.fp32_precision,
        cudnn_rnn=torch.backends.cudnn.rnn.fp32_precision,
    )


def apply_global_precision(allow_tf32: bool = False, matmul_precision: str = "highest") -> PrecisionState:
    """Set float32 matmul precision and TF32 for the whole process; call once, from an entry point.

    The order is the point: `set_float32_matmul_precision` is applied first because 'high' and
    'medium' switch TF32 on; the TF32 flags are then set last so they cannot be overridden.
    Asking for TF32 off together with 'high'/'medium' is a contradiction and raises.

    Returns: the resulting PrecisionState.
    Raises:  ValueError for an unknown precision or a contradictory pair.
    """
    if matmul_precision not in _MATMUL_PRECISIONS:
        raise ValueError(f"matmul_precision must be one of {_MATMUL_PRECISIONS}, got {matmul_precision!r}")
    if not allow_tf32 and matmul_precision != "highest":
        raise ValueError(f"matmul_precision={matmul_precision!r} enables TF32 on CUDA, which contradicts "
                         "allow_tf32=False; use matmul_precision='highest' (DESIGN §2.1)")
    torch.set_float32_matmul_precision(matmul_precision)
    flag = "tf32" if allow_tf32 else "ieee"
    torch.backends.cuda.matmul.fp32_precision = flag
    torch.backends.cudnn.conv.fp32_precision = flag
    torch.backends.cudnn.rnn.fp32_precision = flag
    state = current_precision()
    if state.tf32_enabled != allow_tf32:
        raise RuntimeError(f"TF32 is {'on' if state.tf32_enabled else 'off'} after apply_global_precision("
                           f"allow_tf32={allow_tf32}): {state}")
    return state


def force_grads_fp32(model: torch.nn.Module) -> list[str]:
    """Upcast trainable half-precision tensors (e.g. LoRA weights of a bf16 or 4-bit base) to float32,
    so their gradients and the AdamW arithmetic run in float32. Returns the names that were upcast."""
    changed = []
    for name, p in model.named_parameters():
        if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
            changed.append(name)
    return changed


def autocast_on(device_type: str, dtype: str | torch.dtype):
    """Autocast to `dtype` (bf16/fp16) on `device_type`, for sampling proposals only (DESIGN §1.2)."""
    return torch.autocast(device_type=device_type, dtype=str_to_dtype(dtype))


def autocast_off(device_type: str):
    """Disable any surrounding autocast: scoring, gradients and JVPs run in the model's own dtype."""
    return torch.autocast(device_type=device_type, enabled=False)


@contextlib.contextmanager
def default_dtype(dtype: str | torch.dtype):
    """Temporarily set torch's default dtype (restored on exit)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(str_to_dtype(dtype))
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _rmsnorm_forward_in_dtype(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """RMSNorm computed in max(float32, input dtype): HF's version always computes in float32, which
    rounds a float64 model's activations to float32 at every norm."""
    dt = torch.promote_types(hidden_states.dtype, torch.float32)
    x = hidden_states.to(dt)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)   # (..., d)
    return self.weight * x.to(hidden_states.dtype)


def keep_norms_in_dtype(model: torch.nn.Module) -> int:
    """Make every HF RMSNorm of `model` compute in the model's dtype when that is wider than float32.

    Why: Llama/Qwen2 RMSNorm casts to float32 and back, so a float64 model is float64 only in name
    (finite differences at η ≈ 1e-6 then see float32 noise of ~1e-8 in each log-prob). Returns the
    number of modules changed; float32/bf16 results are unchanged bit for bit.
    """
    n = 0
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = _rmsnorm_forward_in_dtype.__get__(module)
            n += 1
    return n
