"""Tests for entropy_core/checkpoints.py and `checkpoint.dir`, on the folders a REAL transformers.Trainer writes.

A tiny Qwen2 + peft LoRA is trained by `transformers.Trainer` on CPU (max_steps=4, save_steps=2), so the
run's output_dir holds checkpoint-2/ and checkpoint-4/ exactly as users have them: adapter files,
optimizer.pt with the Trainer's two param groups (decay, then an empty no-decay group), scheduler.pt and
trainer_state.json. Truth: the Trainer's own in-memory optimizer and model (state mapping), and one more
real `AdamW.step()` from the loaded state (the update vector, DESIGN §1.1).
"""
import json
import shutil

import pytest
import torch

from entropy_core import stages
from entropy_core.checkpoints import (CheckpointLayoutError, list_run_checkpoints, resolve_checkpoint_dir,
                                      resolve_checkpoint_section, resolve_trainer_checkpoint)
from entropy_core.config import ConfigError, config_from_dict
from entropy_core.loading import load_adam_optimizer_from_path, load_peft_for_probe
from entropy_core.params import get_trainable_named
from entropy_core.update import compute_update_vector
from test_update import reference_loss, rel_err     # the independent Dr.GRPO loss, written out
from tiny import make_base_model, make_tokenizer, random_batch

WEIGHT_DECAY = 0.1        # non-zero: the saved decay group's λ must reach the update vector (trap §2.5)
LR = 1e-2
V_REL_TOL = 1e-10         # float64 probe vs one real float64 AdamW step: round-off only (as test_update)


class _CausalLMData(torch.utils.data.Dataset):
    """16 random token sequences of length 12, labels = inputs (the model shifts them)."""

    def __init__(self, vocab_size: int):
        g = torch.Generator().manual_seed(0)
        self.x = [torch.randint(3, vocab_size, (12,), generator=g) for _ in range(16)]

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "attention_mask": torch.ones(12, dtype=torch.long), "labels": self.x[i]}


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory):
    """(base_dir, output_dir, trainer) after a real Trainer run that saved checkpoint-2 and checkpoint-4."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    root = tmp_path_factory.mktemp("trainer")
    tok = make_tokenizer()
    base = make_base_model(len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            lora_dropout=0.0, task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=str(root / "run"), max_steps=4, save_steps=2, logging_steps=1,
                             per_device_train_batch_size=4, learning_rate=LR, weight_decay=WEIGHT_DECAY,
                             report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=_CausalLMData(len(tok)), processing_class=tok)
    trainer.train()
    return root / "base", root / "run", trainer


def _probe(base_dir, folder):
    model, _ = load_peft_for_probe(base_dir, folder, dtype="float64", device="cpu")
    return model


def u_batch(vocab_size: int):
    b = random_batch(vocab_size, 6, [3, 5], [4, 6, 2], seed=3)
    b["group"] = torch.tensor([0, 0, 0, 1, 1, 1])
    b["advantages"] = torch.tensor([1.0, -0.5, -0.5, 0.3, -0.6, 0.3], dtype=torch.float64)
    return b


# ------------------------------------------------------------------------------------------------ a run
def test_run_checkpoints_are_listed_in_step_order(trainer_run, tmp_path):
    _, run, _ = trainer_run
    assert list_run_checkpoints(run) == [(2, run / "checkpoint-2"), (4, run / "checkpoint-4")]
    for name in ("checkpoint-10", "checkpoint-9", "step_3", "tmp-checkpoint-12", "checkpoint-x", "runs"):
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint-11").write_text("a file, not a folder")
    assert [s for s, _ in list_run_checkpoints(tmp_path)] == [3, 9, 10]      # numeric, not lexical
    (tmp_path / "step_9").mkdir()
    with pytest.raises(ValueError, match="step 9: .* and "):
        list_run_checkpoints(tmp_path)
    with pytest.raises(FileNotFoundError, match="output_dir not found"):
        list_run_checkpoints(tmp_path / "nope")


def test_trainer_folder_is_resolved_with_step_and_learning_rates(trainer_run):
    _, run, _ = trainer_run
    folder = run / "checkpoint-2"
    adapter, optimizer, info = resolve_trainer_checkpoint(folder)
    assert (adapter, optimizer) == (folder, folder / "optimizer.pt")
    state = json.loads((folder / "trainer_state.json").read_text())
    logged = [h for h in state["log_history"] if "learning_rate" in h]
    sched = torch.load(folder / "scheduler.pt", weights_only=True)
    assert info["layout"] == "trainer" and info["warnings"] == []
    assert info["step"] == info["global_step"] == info["folder_step"] == 2
    assert info["learning_rate"] == logged[-1]["learning_rate"] and info["learning_rate_step"] == 2
    assert info["next_learning_rate"] == sched["_last_lr"][0] < info["learning_rate"]      # linear decay


def test_two_param_group_optimizer_maps_onto_the_probe(trainer_run):
    """checkpoint-4 is the Trainer's final state: the loaded AdamW must hold, tensor by tensor (by name),
    the Trainer's own m, s and step, and the saved hyperparameters of the decay group."""
    base, run, trainer = trainer_run
    folder = run / "checkpoint-4"
    saved = torch.load(folder / "optimizer.pt", weights_only=True)
    assert [len(g["params"]) for g in saved["param_groups"]] == [8, 0]                    # decay, then no-decay
    assert [g["weight_decay"] for g in saved["param_groups"]] == [WEIGHT_DECAY, 0.0]
    model = _probe(base, folder)
    opt = load_adam_optimizer_from_path(model, folder / "optimizer.pt")
    assert opt.param_groups[0]["weight_decay"] == WEIGHT_DECAY
    theirs = dict(trainer.model.named_parameters())
    for name, p in get_trainable_named(model).items():
        torch.testing.assert_close(p.detach(), theirs[name].detach().double(), rtol=0, atol=0, msg=name)
        st, ref = opt.state[p], trainer.optimizer.state[theirs[name]]
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(st[key], ref[key].double(), rtol=0, atol=0, msg=f"{name} {key}")
        assert float(st["step"]) == float(ref["step"]) == 4


def test_update_vector_from_the_folder_equals_one_more_real_adamw_step(trainer_run):
    base, run, _ = trainer_run
    folder = run / "checkpoint-2"
    adapter, optimizer, _ = resolve_trainer_checkpoint(folder)
    model = _probe(base, adapter)
    opt = load_adam_optimizer_from_path(model, optimizer)
    b = u_batch(model.config.vocab_size)
    v = compute_update_vector(model, opt, b, microbatch_size=4).vector
    named = get_trainable_named(model)
    before = {n: p.detach().clone() for n, p in named.items()}
    lr = opt.param_groups[0]["lr"]                        # the scheduler's lr for step 3, as saved
    reference_loss(model, b).backward()
    opt.step()                                            # the real AdamW step (fused, as the Trainer saved it)
    real = {n: (p.detach() - before[n]) / lr for n, p in named.items()}
    assert rel_err(v, real) <= V_REL_TOL
    assert any(float(x.abs().max()) > 0 for x in real.values())


# ------------------------------------------------------------------------------------------------ config
def _cfg(base, **checkpoint):
    return config_from_dict({"checkpoint": {"base": str(base), **checkpoint}, "device": "cpu"})


def test_config_dir_is_adapter_plus_optimizer_and_the_pipeline_accepts_it(trainer_run):
    base, run, _ = trainer_run
    folder = str(run / "checkpoint-2")
    cfg = _cfg(base, dir=folder)
    assert (cfg.checkpoint.adapter, cfg.checkpoint.optimizer) == (folder, f"{folder}/optimizer.pt")
    assert config_from_dict(cfg.model_dump(mode="json")) == cfg                   # a dumped config validates
    assert resolve_checkpoint_dir(cfg) is cfg                                     # Trainer layout: nothing to do
    ref = stages.resolve_checkpoint(cfg.checkpoint, cfg.data)
    assert (ref.adapter, ref.optimizer) == (folder, f"{folder}/optimizer.pt")
    explicit = stages.resolve_checkpoint(_cfg(base, adapter=folder, optimizer=f"{folder}/optimizer.pt").checkpoint,
                                         cfg.data)
    assert ref.sha256 == explicit.sha256                                          # the same checkpoint


def test_config_without_dir_dumps_as_before_the_key_existed(tmp_path):
    """Run manifests and stage cache keys written before checkpoint.dir existed stay valid."""
    cfg = _cfg(tmp_path, adapter="a", optimizer="a/optimizer.pt")
    assert "dir" not in cfg.model_dump(mode="json")["checkpoint"]
    assert cfg.model_dump(mode="json")["checkpoint"] == {"base": str(tmp_path), "adapter": "a",
                                                         "optimizer": "a/optimizer.pt", "qlora": False,
                                                         "demo": cfg.checkpoint.demo.model_dump(mode="json")}


def test_config_dir_together_with_adapter_or_optimizer_names_both(tmp_path):
    for extra in ({"adapter": "a"}, {"optimizer": "o.pt"}, {"adapter": "a", "optimizer": "o.pt"}):
        with pytest.raises(ConfigError) as e:
            _cfg(tmp_path, dir=str(tmp_path / "checkpoint-2"), **extra)
        msg = str(e.value)
        assert "checkpoint.dir: checkpoint.dir is set together with" in msg, msg
        assert all(f"checkpoint.{k}" in msg for k in extra), msg


def test_nested_layout_becomes_explicit_paths(trainer_run, tmp_path):
    base, run, _ = trainer_run
    folder = tmp_path / "step_2"
    shutil.copytree(run / "checkpoint-2", folder / "adapter")
    shutil.move(folder / "adapter" / "optimizer.pt", folder / "optimizer.pt")
    adapter, optimizer, info = resolve_trainer_checkpoint(folder)
    assert (adapter, optimizer, info["layout"], info["step"]) == (folder / "adapter", folder / "optimizer.pt",
                                                                  "nested", 2)
    section = resolve_checkpoint_section(_cfg(base, dir=str(folder)).checkpoint)
    assert (section.dir, section.adapter, section.optimizer) == (None, str(folder / "adapter"),
                                                                 str(folder / "optimizer.pt"))


# ------------------------------------------------------------------------------------------------ errors
def _copy(run, tmp_path, name="checkpoint-2"):
    dst = tmp_path / name
    shutil.copytree(run / "checkpoint-2", dst)
    return dst


def test_missing_pieces_are_each_named(trainer_run, tmp_path):
    _, run, _ = trainer_run
    with pytest.raises(CheckpointLayoutError, match="checkpoint folder not found"):
        resolve_trainer_checkpoint(tmp_path / "checkpoint-7")
    only_model = _copy(run, tmp_path / "a")
    (only_model / "optimizer.pt").unlink()
    (only_model / "scheduler.pt").unlink()
    with pytest.raises(CheckpointLayoutError, match="no optimizer.pt .*save_only_model=True"):
        resolve_trainer_checkpoint(only_model)
    both = _copy(run, tmp_path / "b")
    (both / "optimizer.pt").unlink()
    (both / "adapter_config.json").unlink()
    with pytest.raises(CheckpointLayoutError) as e:
        resolve_trainer_checkpoint(both)
    assert "2 problems" in str(e.value) and "adapter_config.json missing" in str(e.value)
    assert "optimizer.pt" in str(e.value)
    sharded = _copy(run, tmp_path / "c")
    (sharded / "optimizer.pt").unlink()
    (sharded / "global_step2").mkdir()
    with pytest.raises(CheckpointLayoutError, match="DeepSpeed ZeRO shards"):
        resolve_trainer_checkpoint(sharded)
    full = _copy(run, tmp_path / "d")
    (full / "adapter_model.safetensors").rename(full / "model.safetensors")
    with pytest.raises(CheckpointLayoutError, match="full fine-tuning checkpoint"):
        resolve_trainer_checkpoint(full)


def test_renamed_folder_warns_and_trusts_trainer_state(trainer_run, tmp_path):
    _, run, _ = trainer_run
    folder = _copy(run, tmp_path, name="checkpoint-3")
    _, _, info = resolve_trainer_checkpoint(folder)
    assert info["step"] == 2 and info["folder_step"] == 3
    assert "global_step=2" in info["warnings"][0]
