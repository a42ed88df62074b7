"""The parameter registry: which tensors are θ, how they map to the optimizer, and θ + ηv.

θ is the trainable (LoRA) tensors only, named as in `model.named_parameters()`. Every
name → tensor dict in the project uses these names, so an update vector, an optimizer state and a
functional override can be checked against each other key by key.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch


def get_trainable_named(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """name -> Parameter for every parameter with requires_grad, in `named_parameters()` order."""
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not named:
        raise ValueError("the model has no trainable parameters; attach a LoRA adapter (load_peft_for_probe) "
                         "or set requires_grad on the tensors to probe")
    return named


def get_optimizer_named_params(model: torch.nn.Module, optimizer: torch.optim.Optimizer
                               ) -> dict[str, torch.nn.Parameter]:
    """name -> Parameter for every tensor the optimizer holds, in the optimizer's own order.

    Raises: ValueError listing optimizer tensors that are not parameters of `model`.
    """
    by_id = {id(p): n for n, p in model.named_parameters()}
    named, missing = {}, []
    for gi, group in enumerate(optimizer.param_groups):
        for pi, p in enumerate(group["params"]):
            if id(p) in by_id:
                named[by_id[id(p)]] = p
            else:
                missing.append(f"group {gi} param {pi} shape {tuple(p.shape)}")
    if missing:
        raise ValueError(f"{len(missing)} optimizer tensors are not parameters of the model: "
                         + ", ".join(missing))
    return named


def to_cpu_fp32_named(named: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached float32 CPU copies (for artifacts and reports)."""
    return {n: t.detach().to(device="cpu", dtype=torch.float32).clone() for n, t in named.items()}


def _check_same_keys_and_shapes(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], what: str) -> None:
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a or only_b:
        raise ValueError(f"{what}: key mismatch; only in first: {only_a[:5]}{'…' if len(only_a) > 5 else ''}, "
                         f"only in second: {only_b[:5]}{'…' if len(only_b) > 5 else ''}")
    bad = [f"{n}: {tuple(a[n].shape)} vs {tuple(b[n].shape)}" for n in a if a[n].shape != b[n].shape]
    if bad:
        raise ValueError(f"{what}: {len(bad)} shape mismatches: " + ", ".join(bad))


def dot_named(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """⟨a, b⟩ = Σ_name Σ a·b, accumulated in float64 on CPU; keys and shapes must match exactly.

    Returns: 0-dim float64 tensor.
    """
    _check_same_keys_and_shapes(a, b, "dot_named")
    total = torch.zeros((), dtype=torch.float64)
    for n in a:
        total += (a[n].detach().double() * b[n].detach().to(a[n].device).double()).sum().cpu()
    return total


def build_functional_params_named(model: torch.nn.Module, v_named: Mapping[str, torch.Tensor],
                                  eta: float | torch.Tensor, *, dtype: torch.dtype | None = None,
                                  allow_frozen: bool = False) -> dict[str, torch.Tensor]:
    """Parameter overrides θ + ηv for `torch.func.functional_call(model, overrides, ...)`.

    Only the tensors named in `v_named` are overridden; functional_call takes every other tensor from
    the module. Both operands are upcast to `dtype` (default: the parameter's dtype) before the sum, so
    a float32 v on a float64 model loses nothing. `eta` may be a tensor (a dual number inside
    `torch.func.jvp`), which is how the derivative along v is taken.

    Returns: dict name -> tensor (parameter's shape, `dtype` or the parameter's dtype, parameter's device).
    Raises:  ValueError listing every name that is not a parameter, not trainable (unless
             allow_frozen), of the wrong shape, or with non-finite entries in v.
    """
    params = dict(model.named_parameters())
    unknown = [n for n in v_named if n not in params]
    frozen = [n for n in v_named if n in params and not params[n].requires_grad]
    shape = [f"{n}: v {tuple(v_named[n].shape)} vs parameter {tuple(params[n].shape)}"
             for n in v_named if n in params and v_named[n].shape != params[n].shape]
    nonfinite = [n for n in v_named if not torch.isfinite(v_named[n]).all()]
    errors = []
    if unknown:
        errors.append(f"{len(unknown)} names in v_named are not parameters of the model: {', '.join(unknown)}")
    if frozen and not allow_frozen:
        errors.append(f"{len(frozen)} names in v_named are not trainable parameters: {', '.join(frozen)}. "
                      "Pass allow_frozen=True to include them")
    if shape:
        errors.append(f"{len(shape)} shape mismatches: {', '.join(shape)}")
    if nonfinite:
        errors.append(f"{len(nonfinite)} tensors of v_named have non-finite entries: {', '.join(nonfinite)}")
    if not isinstance(eta, torch.Tensor) and not torch.isfinite(torch.tensor(float(eta))):
        errors.append(f"eta must be finite, got {eta}")
    if errors:
        raise ValueError("; ".join(errors))
    out = {}
    for n, v in v_named.items():
        p = params[n]
        dt = dtype or p.dtype
        out[n] = p.detach().to(dt) + eta * v.to(device=p.device, dtype=dt)  # θ + ηv, DESIGN §1.2
    return out
