import pytest
import torch

from entropy_core.precision import (apply_global_precision, current_precision, force_grads_fp32,
                                    keep_norms_in_dtype, str_to_dtype)
from tiny import make_base_model


@pytest.fixture
def restore_precision():
    old = current_precision()
    yield
    torch.set_float32_matmul_precision(old.matmul_precision)
    torch.backends.cuda.matmul.fp32_precision = old.cuda_matmul
    torch.backends.cudnn.conv.fp32_precision = old.cudnn_conv
    torch.backends.cudnn.rnn.fp32_precision = old.cudnn_rnn


def test_tf32_stays_off_even_after_high_was_set(restore_precision):
    """DESIGN §2.1: 'high' turns TF32 on; apply_global_precision must leave it really off."""
    torch.set_float32_matmul_precision("high")
    assert current_precision().tf32_enabled
    state = apply_global_precision(allow_tf32=False, matmul_precision="highest")
    assert not state.tf32_enabled
    assert torch.get_float32_matmul_precision() == "highest"
    assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    assert torch.backends.cudnn.conv.fp32_precision == "ieee"
    assert torch.backends.cudnn.rnn.fp32_precision == "ieee"


def test_tf32_on_when_asked_and_contradiction_refused(restore_precision):
    assert apply_global_precision(allow_tf32=True, matmul_precision="high").tf32_enabled
    with pytest.raises(ValueError, match="contradicts allow_tf32=False"):
        apply_global_precision(allow_tf32=False, matmul_precision="high")
    with pytest.raises(ValueError, match="matmul_precision must be one of"):
        apply_global_precision(allow_tf32=False, matmul_precision="ultra")


@pytest.mark.parametrize("name,dtype", [("fp32", torch.float32), ("float32", torch.float32),
                                        ("torch.float64", torch.float64), ("bf16", torch.bfloat16),
                                        ("FP64", torch.float64), (torch.float16, torch.float16)])
def test_str_to_dtype(name, dtype):
    assert str_to_dtype(name) is dtype


def test_str_to_dtype_rejects_unknown():
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        str_to_dtype("fp8")


def test_force_grads_fp32_upcasts_trainable_half_tensors_only():
    m = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)).to(torch.bfloat16)
    m[1].weight.requires_grad_(False)
    changed = force_grads_fp32(m)
    assert changed == ["0.weight", "0.bias", "1.bias"]
    assert m[0].weight.dtype == torch.float32 and m[1].weight.dtype == torch.bfloat16


def test_keep_norms_in_dtype_makes_float64_exact():
    """HF RMSNorm rounds to float32; patched, a float64 model agrees with a float64 reference norm
    to float64 round-off, and a float32 model is unchanged bit for bit."""
    m64 = make_base_model(50, dtype=torch.float64)
    norm = m64.model.norm
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    ref = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))
    torch.testing.assert_close(norm(x), ref, rtol=1e-15, atol=1e-15)
    m32 = make_base_model(50, dtype=torch.float32)
    x32 = x.float()
    expected = type(m32.model.norm).forward(m32.model.norm, x32)          # HF's own float32 forward
    assert keep_norms_in_dtype(m32) == 2 * 2 + 1
    assert torch.equal(m32.model.norm(x32), expected)
