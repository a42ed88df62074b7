"""A small real checkpoint to measure offline: a few Dr.GRPO steps with AdamW from a fresh LoRA.

The measurement needs a checkpoint whose AdamW state has stepped (m, s, t₀ of DESIGN §1.1). With no
Hub access, `make_demo_checkpoint` makes one: SmolLM2-135M-Instruct (the offline stand-in, ≈0% on
GSM8K) plus LoRA(q, v), trained for `steps` real Dr.GRPO steps on GSM8K prompts. Each step is what
`update.py` simulates:
U from `SequenceProcessor.sample_U`, c_i = −A_i/(B_U·G·L_max), loss L = Σ_i c_i S_i
(`accumulate_gradient`, the very loss `compute_update_vector` differentiates), then `AdamW.step()`.

    python -m entropy_core.demo /tmp/demo_ckpt --steps 2      # prints the checkpoint directory

Output directory (built under a temporary name next to it, then renamed, so it is complete or absent):
Reward: `gsm8k_tag_shaped` = gsm8k_tag with a format credit, plus a small numeric shaping term. SmolLM2
never writes "</think> <answer>…</answer>" in 48 tokens (40 of 40 sampled responses got gsm8k_tag = 0
with format_weight 0.1), so with gsm8k_tag alone every group is degenerate (A = 0, no gradient) and
sample_U fails; the shaping term makes the rewards of a group differ whenever its last numbers differ.

    adapter/        peft save_pretrained (+ the tokenizer)
    optimizer.pt    torch.save(optimizer.state_dict()), readable by load_adam_optimizer_from_path
    demo.json       what was done: settings, rewards and loss per step, versions
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .data import get_reward_fn, load_dataset_split
from .params import get_trainable_named
from .sequences import DegenerateGroupsError, SequenceProcessor
from .update import accumulate_gradient, drgrpo_coefficients

__all__ = ["make_demo_checkpoint", "DEMO_NOTE"]

DEMO_NOTE = "SmolLM2-135M-Instruct is a stand-in demo model (~0% GSM8K accuracy)"
_DONE = "demo.json"       # written last: its presence marks a complete checkpoint


def make_demo_checkpoint(out_dir: str | os.PathLike, *, steps: int = 2, seed: int = 0, base: str = "smollm2_135m",
                         lora_r: int = 8, lora_alpha: int = 16, target_modules: Sequence[str] = ("q_proj", "v_proj"),
                         lr: float = 1e-5, weight_decay: float = 0.01, B_U: int = 2, G: int = 4,
                         max_new_tokens: int = 48, dataset: str = "gsm8k_r1_template", split: str = "train",
                         format_weight: float = 0.1,
                         reward: str | Callable[[str, str], float] = "gsm8k_tag_shaped",
                         microbatch_size: int = 8, model_and_tokenizer: tuple | None = None,
                         log: Callable[[str], None] = print) -> Path:
    """Train a fresh LoRA for `steps` Dr.GRPO steps with AdamW and save adapter + optimizer state.

    Args:
        out_dir: checkpoint directory; if it already holds demo.json it is returned as is.
        base: registry name / dir of the base model (ignored when `model_and_tokenizer` is given).
        lora_r, lora_alpha, target_modules: the fresh LoRA (dropout 0).
        lr, weight_decay: torch.optim.AdamW hyperparameters (betas, eps: torch defaults).
        B_U, G, max_new_tokens: update batch per step (sample_U, temperature 1, stop "</answer>").
        dataset, split: prompts (a registry name or a JSONL path, see data.load_dataset_split).
        reward: reward spec (a registered name or "module:function", called with format_weight=) or a
            callable (response_text, gold) -> float used as is. Default: gsm8k_tag_shaped (see above).
        model_and_tokenizer: (peft model, tokenizer) to train instead of loading `base` (tests).
        log: where the progress lines go.
    Returns: out_dir as a Path.
    Raises: DegenerateGroupsError naming the step when every response of a group gets the same reward;
            FileExistsError when out_dir exists without demo.json (not ours to overwrite).
    """
    out = Path(out_dir)
    if (out / _DONE).is_file():
        log(f"demo checkpoint: {out} is complete, reusing it")
        return out
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise FileExistsError(f"{out} exists but holds no {_DONE}: not a finished demo checkpoint. "
                              "Remove it or choose another out_dir")
    t_start = time.perf_counter()
    new_adapter = {"r": lora_r, "lora_alpha": lora_alpha, "target_modules": list(target_modules), "lora_dropout": 0.0}
    if model_and_tokenizer is None:
        from .loading import load_peft_for_probe       # heavy import only when loading a real base
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)                    # LoRA A's random init, reproducibly
            model, tok = load_peft_for_probe(base, None, new_adapter=new_adapter)
    else:
        model, tok = model_and_tokenizer
    examples = load_dataset_split(dataset, split)
    reward_fn = reward if callable(reward) else get_reward_fn(reward, format_weight=format_weight)
    reward_name = getattr(reward, "__qualname__", repr(reward)) if callable(reward) else reward
    named = get_trainable_named(model)
    optimizer = torch.optim.AdamW(list(named.items()), lr=lr, weight_decay=weight_decay)   # saves param_names
    proc = SequenceProcessor(model, tok, max_new_tokens=max_new_tokens, temperature=1.0, stop="</answer>",
                             batch_size=max(B_U * G, 1))
    history = []
    for step in range(steps):
        t0 = time.perf_counter()
        try:
            U = proc.sample_U(examples, B_U, G, reward_fn=reward_fn, seed=seed + step)
        except DegenerateGroupsError as e:
            raise DegenerateGroupsError(f"demo checkpoint step {step + 1}/{steps}: {e}") from e
        T = U.response_mask.sum(-1)                                                  # (N,) scored tokens
        coef = drgrpo_coefficients(U.advantages, U.group, T)                         # (N,) L = Σ c_i S_i, DESIGN §1.1
        was_training = model.training
        model.eval()                                                                 # as the update vector: dropout off
        try:
            g, _, loss = accumulate_gradient(model, named, U, coef, microbatch_size=microbatch_size)
        finally:
            model.train(was_training)
        for n, p in named.items():
            p.grad = g[n].to(p.dtype)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        r = U.rewards.tolist()
        history.append({"step": step + 1, "rewards": r, "mean_reward": sum(r) / len(r), "loss": loss,
                        "tokens": int(T.sum()), "prompt_index": sorted(set(U.prompt_index.tolist())),
                        "seconds": round(time.perf_counter() - t0, 3)})
        log(f"demo checkpoint: step {step + 1}/{steps}, mean reward {sum(r) / len(r):.3f}, loss {loss:.4g}, "
            f"{int(T.sum())} tokens, {time.perf_counter() - t0:.1f} s")

    info = {"base": str(base) if model_and_tokenizer is None else "model_and_tokenizer (given)",
            "steps": steps, "seed": seed, "lr": lr, "weight_decay": weight_decay, "optimizer": "torch.optim.AdamW",
            "lora": new_adapter, "B_U": B_U, "G": G, "max_new_tokens": max_new_tokens, "temperature": 1.0,
            "stop": "</answer>", "dataset": dataset, "split": split, "reward": reward_name,
            "format_weight": None if callable(reward) else format_weight, "history": history,
            "rewards_per_step": [h["rewards"] for h in history], "loss_per_step": [h["loss"] for h in history],
            "trainable_tensors": len(named), "trainable_params": sum(p.numel() for p in named.values()),
            "seconds": round(time.perf_counter() - t_start, 3), "versions": _versions(), "note": DEMO_NOTE}
    _write_atomically(out, model, tok, optimizer, info)
    log(f"demo checkpoint: wrote {out} in {time.perf_counter() - t_start:.1f} s")
    return out


def _write_atomically(out: Path, model, tok, optimizer, info: dict) -> None:
    """Build the directory under a temporary name beside `out`, then rename it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp / "adapter")
        tok.save_pretrained(tmp / "adapter")          # load_peft_for_probe prefers the adapter's tokenizer
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / _DONE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / _DONE).is_file():         # not a concurrent writer finishing first: a real failure
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "peft", "entropy-core"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Make the offline demo checkpoint (adapter + AdamW state).")
    ap.add_argument("out_dir")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base", default="smollm2_135m")
    ap.add_argument("--B-U", dest="B_U", type=int, default=2)
    ap.add_argument("--G", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    a = ap.parse_args(argv)
    print(make_demo_checkpoint(a.out_dir, steps=a.steps, seed=a.seed, base=a.base, B_U=a.B_U, G=a.G,
                               max_new_tokens=a.max_new_tokens))


if __name__ == "__main__":
    main()
