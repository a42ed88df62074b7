import pytest
import torch
from torch.func import functional_call

from entropy_core.params import (build_functional_params_named, dot_named, get_optimizer_named_params,
                                 get_trainable_named, to_cpu_fp32_named)
from entropy_core.scoring import position_ids_from_mask
from tiny import make_lora_model, random_batch


def _logits(model, batch, params=None):
    kw = dict(attention_mask=batch["attention_mask"], position_ids=position_ids_from_mask(batch["attention_mask"]))
    with torch.no_grad():
        if params is None:
            return model(batch["input_ids"], **kw).logits
        return functional_call(model, params, (batch["input_ids"],), kw).logits


def test_trainable_are_the_lora_tensors():
    m = make_lora_model(40)
    names = list(get_trainable_named(m))
    assert names and all("lora_" in n for n in names)
    assert len(names) == 2 * 2 * 2          # 2 layers × (q, v) × (A, B)


def test_optimizer_names_follow_optimizer_order():
    m = make_lora_model(40)
    named = get_trainable_named(m)
    rev = list(named.values())[::-1]
    opt = torch.optim.AdamW([{"params": rev[:3]}, {"params": rev[3:]}])
    assert list(get_optimizer_named_params(m, opt)) == list(named)[::-1]
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match="1 optimizer tensors are not parameters of the model"):
        get_optimizer_named_params(m, opt2)


def test_dot_named_float64_and_mismatch_errors():
    a = {"x": torch.ones(3, dtype=torch.float32), "y": torch.full((2, 2), 2.0)}
    b = {"x": torch.full((3,), 1e-8), "y": torch.ones(2, 2, dtype=torch.float64)}
    d = dot_named(a, b)
    assert d.dtype == torch.float64 and d.item() == pytest.approx(3e-8 + 8.0, rel=1e-15)
    with pytest.raises(ValueError, match="key mismatch"):
        dot_named(a, {"x": b["x"]})
    with pytest.raises(ValueError, match=r"y: \(2, 2\) vs \(4,\)"):
        dot_named(a, {"x": b["x"], "y": torch.ones(4)})


def test_to_cpu_fp32_named_copies():
    t = {"a": torch.ones(2, dtype=torch.float64, requires_grad=True)}
    out = to_cpu_fp32_named(t)
    assert out["a"].dtype == torch.float32 and not out["a"].requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_functional_call_at_zero_is_bitwise_the_module(dtype):
    m = make_lora_model(40, dtype=dtype)
    batch = random_batch(40, 3, [2, 4], [3, 5])
    v = {n: torch.randn_like(p) for n, p in get_trainable_named(m).items()}
    assert torch.equal(_logits(m, batch, build_functional_params_named(m, v, 0.0)), _logits(m, batch))


def test_functional_call_matches_in_place_edit():
    m = make_lora_model(40, dtype=torch.float64)
    batch = random_batch(40, 3, [2, 4], [3, 5])
    v = {n: torch.randn_like(p) for n, p in get_trainable_named(m).items()}
    eta = 0.37
    got = _logits(m, batch, build_functional_params_named(m, v, eta))
    with torch.no_grad():
        for n, p in get_trainable_named(m).items():
            p.add_(eta * v[n])
    torch.testing.assert_close(got, _logits(m, batch), rtol=1e-13, atol=1e-13)


def test_functional_params_upcast_before_sum():
    m = make_lora_model(40, dtype=torch.float32)
    n0, p0 = next(iter(get_trainable_named(m).items()))
    v = {n0: torch.full_like(p0, 1e-9)}
    out = build_functional_params_named(m, v, 1.0, dtype=torch.float64)[n0]
    assert out.dtype == torch.float64
    torch.testing.assert_close(out - p0.detach().double(), torch.full_like(out, 1e-9), rtol=1e-6, atol=0)


def test_functional_params_validation_lists_every_offender():
    m = make_lora_model(40)
    named = get_trainable_named(m)
    frozen = [n for n, p in m.named_parameters() if not p.requires_grad][:2]
    v = {n: torch.zeros_like(dict(m.named_parameters())[n]) for n in frozen}
    with pytest.raises(ValueError, match="2 names in v_named are not trainable parameters") as e:
        build_functional_params_named(m, v, 1.0)
    assert all(n in str(e.value) for n in frozen) and "allow_frozen=True" in str(e.value)
    assert set(build_functional_params_named(m, v, 1.0, allow_frozen=True)) == set(frozen)
    with pytest.raises(ValueError, match="not parameters of the model: nope"):
        build_functional_params_named(m, {"nope": torch.zeros(1)}, 1.0)
    n0, p0 = next(iter(named.items()))
    with pytest.raises(ValueError, match="1 shape mismatches"):
        build_functional_params_named(m, {n0: torch.zeros(p0.numel() + 1)}, 1.0)
    bad = torch.zeros_like(p0)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite entries: " + n0.replace(".", r"\.")):
        build_functional_params_named(m, {n0: bad}, 1.0)
    with pytest.raises(ValueError, match="eta must be finite"):
        build_functional_params_named(m, {n0: torch.zeros_like(p0)}, float("inf"))
