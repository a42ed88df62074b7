"""A whole tiny measurement setup on disk, for the runner tests (test_measure.py, test_pipeline.py).

`build_setup(root)` writes, in seconds on a CPU:
    root/base/        a random tiny Qwen2 + its BPE tokenizer (tests/tiny.py), save_pretrained
    root/ckpt/        adapter/ + optimizer.pt: a fresh LoRA after 2 real Dr.GRPO + AdamW steps
                      (entropy_core.demo.make_demo_checkpoint on the tiny model)
    root/prompts.jsonl  a dozen {"question", "answer"} records
and returns a config dict (B_E 8, B_U 2, G 2, 8 new tokens, η ∈ {1e-3, 2e-3}) for `config_from_dict`.

The reward is `toy_reward` below ("pipeline_fixtures:toy_reward"): a random tiny model never writes
"<answer>", so gsm8k_tag would give every U group equal rewards (no gradient). A hash of the text
gives distinct, deterministic rewards instead. Flow subprocesses need `tests/` on PYTHONPATH for it.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import torch

from entropy_core.demo import make_demo_checkpoint
from entropy_core.loading import load_peft_for_probe
from tiny import make_base_model, make_tokenizer

REWARD = "pipeline_fixtures:toy_reward"
ETAS = [1e-3, 2e-3]


def toy_reward(response_text: str, gold: str) -> float:
    """A deterministic pseudo-random reward in [0, 1) per response text."""
    return int(hashlib.sha256(response_text.encode()).hexdigest()[:8], 16) / 2 ** 32


def _write_prompts(path: Path, n: int = 12) -> Path:
    g = torch.Generator().manual_seed(1)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            a, b = torch.randint(1, 50, (2,), generator=g).tolist()
            f.write(json.dumps({"question": f"Tom has {a} apples and buys {b} more. How many?",
                                "answer": a + b}) + "\n")
    return path


def build_setup(root: str | Path) -> dict:
    """Base model dir, trained adapter + optimizer.pt, prompts; returns the config dict (output_dir unset)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer()
    base = make_base_model(len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    prompts = _write_prompts(root / "prompts.jsonl")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)                       # the LoRA A init
        model, tok = load_peft_for_probe(root / "base", new_adapter={"r": 4, "lora_alpha": 8,
                                                                     "target_modules": ["q_proj", "v_proj"]},
                                         device="cpu")
    ckpt = make_demo_checkpoint(root / "ckpt", steps=2, seed=0, lr=1e-2, B_U=2, G=2, max_new_tokens=8,
                                dataset=str(prompts), split="train", reward=toy_reward,
                                model_and_tokenizer=(model, tok), log=lambda msg: None)
    return {
        "seed": 0,
        "device": "cpu",
        "checkpoint": {"base": str(root / "base"), "adapter": str(ckpt / "adapter"),
                       "optimizer": str(ckpt / "optimizer.pt")},
        "data": {"dataset": str(prompts), "reward": REWARD},
        "batches": {"B_E": 8, "B_U": 2, "G": 2},
        "generation": {"max_new_tokens": 8, "batch_size": 16},
        "update": {"microbatch_size": 4},
        "estimator": {"eta_list": list(ETAS), "microbatch_size": 4},
        "pipeline": {"retries": 2, "retry_delay_seconds": [0]},
    }


def with_output(config: dict, output_dir: str | Path, **sections) -> dict:
    """A copy of `config` with output_dir set and sections updated key by key."""
    cfg = copy.deepcopy(config)
    cfg["output_dir"] = str(output_dir)
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    return cfg


def flatten(x, path: str = "") -> dict:
    """Every leaf of nested dicts / lists by its path ("true[0].delta_h"), to compare two results.json."""
    if isinstance(x, dict):
        return {k: v for key, val in x.items() for k, v in flatten(val, f"{path}.{key}" if path else key).items()}
    if isinstance(x, list):
        return {k: v for i, val in enumerate(x) for k, v in flatten(val, f"{path}[{i}]").items()}
    return {path: x}
