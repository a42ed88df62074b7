"""Checkpoints as training runs leave them: a HF Trainer / TRL `checkpoint-N/` folder, and a run's output_dir.

DESIGN §2, "Checkpoints users already have". A Trainer (or TRL's GRPOTrainer, which is one) saves, every
`save_steps`, a folder

    output_dir/checkpoint-N/
        adapter_model.safetensors, adapter_config.json    the LoRA θ after N steps (peft save_pretrained)
        optimizer.pt        a plain optimizer.state_dict(): TWO param groups, decayed tensors first, then
                            the weight-decay-0 group (empty for LoRA: every LoRA tensor is a Linear weight)
        scheduler.pt        the LR scheduler; its `_last_lr` is the lr of step N+1
        trainer_state.json  global_step, epoch, log_history (the lr logged at each logging step)
        rng_state.pth, training_args.bin, tokenizer files   (not read here; training_args.bin is a pickle)

`resolve_trainer_checkpoint(folder)` checks such a folder and returns where the adapter and the optimizer
state are, plus what trainer_state.json and scheduler.pt say (step, learning rates). It also accepts the
layout `make_demo_checkpoint` and many hand-written loops use: `folder/adapter/` + `folder/optimizer.pt`.
`list_run_checkpoints(output_dir)` lists a run's `checkpoint-N/` or `step_N/` folders in step order.

The learning rate does not enter the measurement: v = Δθ/lr is lr-free for AdamW (DESIGN §1.1), and the
η grid is in the same units as lr. It is reported so that η can be compared with the lr actually used.

In a config, `checkpoint.dir: <folder>` stands for `checkpoint.adapter: <folder>` plus
`checkpoint.optimizer: <folder>/optimizer.pt` (the Trainer layout; see entropy_core.config). Validation
never touches the filesystem; `resolve_checkpoint_dir(cfg)` does, with the errors below, and rewrites the
other layout into explicit adapter / optimizer paths.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointLayoutError", "resolve_trainer_checkpoint", "list_run_checkpoints", "checkpoint_step",
           "resolve_checkpoint_section", "resolve_checkpoint_dir", "OPTIMIZER_NAME", "ADAPTER_CONFIG_NAME"]

OPTIMIZER_NAME = "optimizer.pt"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
SCHEDULER_NAME = "scheduler.pt"
TRAINER_STATE_NAME = "trainer_state.json"
# checkpoint-N (HF Trainer, TRL), step_N (many custom loops); tmp-checkpoint-N is a save in progress
_STEP_DIR = re.compile(r"^(?:checkpoint-|step_)(\d+)$")


class CheckpointLayoutError(FileNotFoundError):
    """A checkpoint folder that lacks what the measurement needs (each missing piece is named). Not retried."""


# ------------------------------------------------------------------------------------------------ one folder
def _adapter_problems(d: Path) -> list[str]:
    missing = []
    if not (d / ADAPTER_CONFIG_NAME).is_file():
        missing.append(ADAPTER_CONFIG_NAME)
    if not any((d / w).is_file() for w in ADAPTER_WEIGHT_NAMES):
        missing.append(" or ".join(ADAPTER_WEIGHT_NAMES))
    return missing


def _optimizer_hint(folder: Path) -> str:
    """Why optimizer.pt may be missing, from what else the folder holds."""
    names = {p.name for p in folder.iterdir()}
    if any(n.startswith("global_step") for n in names):
        return ("the folder holds DeepSpeed ZeRO shards (global_step*/); consolidate them into one "
                "optimizer.state_dict() first (one unsharded optimizer.pt is needed)")
    if any(n.startswith("optimizer_") for n in names):
        return ("the folder holds an FSDP sharded optimizer (optimizer_*/); save with a FULL_STATE_DICT "
                "state_dict_type to get one optimizer.pt")
    if SCHEDULER_NAME not in names:
        return ("the run was probably saved with save_only_model=True, which drops the AdamW state; "
                "the update vector needs it (DESIGN §1.1), so rerun with save_only_model=False")
    return "the update vector needs the saved AdamW state (DESIGN §1.1)"


def checkpoint_step(folder: str | os.PathLike) -> int | None:
    """N of a `checkpoint-N` / `step_N` folder name, else None."""
    m = _STEP_DIR.match(Path(folder).name)
    return int(m.group(1)) if m else None


def _trainer_state(path: Path, info: dict[str, Any]) -> None:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        info["warnings"].append(f"{path.name} is unreadable ({type(e).__name__}: {e}); step and lr unknown")
        return
    info["global_step"] = state.get("global_step")
    info["epoch"] = state.get("epoch")
    logged = [h for h in state.get("log_history") or [] if isinstance(h, dict) and "learning_rate" in h]
    if logged:                                       # the lr of the last logged step (<= global_step)
        info["learning_rate"] = float(logged[-1]["learning_rate"])
        info["learning_rate_step"] = logged[-1].get("step")


def _scheduler(path: Path, info: dict[str, Any]) -> None:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        last = sd.get("_last_lr") if isinstance(sd, dict) else None
    except Exception as e:  # any unreadable scheduler only costs the info, never the measurement
        info["warnings"].append(f"{path.name} is unreadable with weights_only=True ({type(e).__name__}); "
                                "next_learning_rate unknown")
        return
    if last:
        info["next_learning_rate"] = float(last[0])  # the lr the step after this checkpoint would use


def resolve_trainer_checkpoint(path: str | os.PathLike) -> tuple[Path, Path, dict[str, Any]]:
    """Adapter directory, optimizer.pt and what the folder says about itself, for one checkpoint folder.

    Layouts: "trainer" (HF Trainer / TRL: adapter files and optimizer.pt directly in the folder) and
    "nested" (`adapter/` subfolder + optimizer.pt, as make_demo_checkpoint writes).
    Args:    path: the folder, e.g. out/checkpoint-500.
    Returns: (adapter_dir, optimizer_path, info), paths absolute; info holds layout, step (global_step of
             trainer_state.json, else the N of the folder name), folder_step, global_step, epoch,
             learning_rate (last logged) and learning_rate_step, next_learning_rate (scheduler.pt),
             scheduler / trainer_state paths (None when absent) and warnings (list of str).
    Raises:  CheckpointLayoutError (a FileNotFoundError) naming every missing piece: the folder, the
             adapter config / weights, optimizer.pt (with the likely reason: save_only_model, DeepSpeed or
             FSDP shards), or a full-model checkpoint where a LoRA adapter was expected.
    """
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise CheckpointLayoutError(f"checkpoint folder not found: {folder}")
    problems = []
    nested = folder / "adapter"
    if not _adapter_problems(folder):
        layout, adapter = "trainer", folder
    elif nested.is_dir() and not _adapter_problems(nested):
        layout, adapter = "nested", nested
    else:
        layout, adapter = "trainer", folder
        missing = _adapter_problems(folder)
        if any((folder / n).is_file() for n in ("model.safetensors", "model.safetensors.index.json",
                                                 "pytorch_model.bin")):
            problems.append(f"no LoRA adapter ({', '.join(missing)} missing) but full model weights: this is a "
                            "full fine-tuning checkpoint, and entropy-core probes LoRA adapters only")
        else:
            problems.append(f"no LoRA adapter: {', '.join(missing)} missing in {folder} (and no adapter/ "
                            "subfolder holding them); the Trainer writes them when the model is a peft model")
    optimizer = folder / OPTIMIZER_NAME
    if not optimizer.is_file():
        problems.append(f"no {OPTIMIZER_NAME} in {folder}: {_optimizer_hint(folder)}")
    if problems:
        raise CheckpointLayoutError(f"{len(problems)} problem{'s' if len(problems) > 1 else ''} with checkpoint "
                                    f"{folder}:\n" + "\n".join(f"  - {p}" for p in problems))
    info: dict[str, Any] = {"layout": layout, "folder": str(folder), "folder_step": checkpoint_step(folder),
                            "global_step": None, "epoch": None, "learning_rate": None, "learning_rate_step": None,
                            "next_learning_rate": None, "scheduler": None, "trainer_state": None, "warnings": []}
    if (folder / TRAINER_STATE_NAME).is_file():
        info["trainer_state"] = str(folder / TRAINER_STATE_NAME)
        _trainer_state(folder / TRAINER_STATE_NAME, info)
    if (folder / SCHEDULER_NAME).is_file():
        info["scheduler"] = str(folder / SCHEDULER_NAME)
        _scheduler(folder / SCHEDULER_NAME, info)
    if None not in (info["global_step"], info["folder_step"]) and info["global_step"] != info["folder_step"]:
        info["warnings"].append(f"trainer_state.json says global_step={info['global_step']} but the folder is "
                                f"named for step {info['folder_step']}; step = global_step")
    info["step"] = info["global_step"] if info["global_step"] is not None else info["folder_step"]
    return adapter, optimizer, info


# ------------------------------------------------------------------------------------------------ a whole run
def list_run_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """The checkpoint folders of a training run, `checkpoint-N/` or `step_N/`, in numeric step order.

    Only the names are read (a folder is not checked here; `resolve_trainer_checkpoint` does that), so a
    save in progress (`tmp-checkpoint-N`) and other files are skipped.
    Args:    output_dir: the run's output_dir (TrainingArguments.output_dir).
    Returns: [(N, absolute path), ...] sorted by N (checkpoint-10 after checkpoint-9); [] when none.
    Raises:  FileNotFoundError if output_dir is not a directory; ValueError naming both folders when two
             folders claim the same step (checkpoint-5 and step_5, or checkpoint-05).
    """
    root = Path(output_dir).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"training output_dir not found: {root}")
    found: dict[int, Path] = {}
    clashes = []
    for p in root.iterdir():
        step = checkpoint_step(p)
        if step is None or not p.is_dir():
            continue
        if step in found:
            clashes.append(f"step {step}: {found[step].name} and {p.name}")
        found[step] = p
    if clashes:
        raise ValueError(f"{root} has several folders for one step ({'; '.join(sorted(clashes))}); keep one")
    return sorted(found.items())


# ------------------------------------------------------------------------------------------------ config
def resolve_checkpoint_section(checkpoint):
    """A CheckpointConfig whose `dir` has been checked on disk and turned into explicit paths.

    With `dir` unset it is returned unchanged. With the Trainer layout adapter/optimizer already are
    `dir` and `dir/optimizer.pt` (config validation put them there), so only the check is new; with the
    nested layout the result has dir=None and adapter=`dir/adapter`, optimizer=`dir/optimizer.pt`.
    Raises: CheckpointLayoutError (see resolve_trainer_checkpoint).
    """
    if checkpoint.dir is None:
        return checkpoint
    adapter, optimizer, info = resolve_trainer_checkpoint(checkpoint.dir)
    if info["layout"] == "trainer":
        return checkpoint
    data = checkpoint.model_dump()
    data.update(dir=None, adapter=str(adapter), optimizer=str(optimizer))
    return type(checkpoint).model_validate(data)


def resolve_checkpoint_dir(cfg):
    """`resolve_checkpoint_section` applied to a MeasureConfig's checkpoint section; returns a new config."""
    section = resolve_checkpoint_section(cfg.checkpoint)
    return cfg if section is cfg.checkpoint else cfg.model_copy(update={"checkpoint": section})
