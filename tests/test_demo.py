"""make_demo_checkpoint: real Dr.GRPO + AdamW steps, written atomically, loadable by loading.py."""
import importlib.util
import json

import pytest
import torch
from peft import PeftModel

from entropy_core.data.rewards import gsm8k_tag_shaped
from entropy_core.demo import make_demo_checkpoint
from entropy_core.sequences import DegenerateGroupsError
from tiny import add_lora, make_base_model, make_tokenizer

HAVE_LOADING = importlib.util.find_spec("entropy_core.loading") is not None


def length_reward(text: str, gold: str) -> float:
    return float(len(text) % 3)


@pytest.fixture
def dataset(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"question": f"Tom has {i} apples and buys {i} more. How many?",
                                        "answer": str(2 * i)}) + "\n" for i in range(1, 9)))
    return str(path)


def tiny_policy():
    tok = make_tokenizer()
    return add_lora(make_base_model(len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)), tok


def test_demo_checkpoint_is_complete_loadable_and_reused(tmp_path, dataset):
    model, tok = tiny_policy()
    out, lines = tmp_path / "ckpt", []
    kw = dict(steps=2, B_U=2, G=3, max_new_tokens=8, dataset=dataset, reward=length_reward, lr=1e-3, log=lines.append)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert make_demo_checkpoint(out, model_and_tokenizer=(model, tok), **kw) == out
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "demo.json", "optimizer.pt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directory left behind"
    info = json.loads((out / "demo.json").read_text())
    assert info["steps"] == 2 and len(info["rewards_per_step"]) == 2 and len(info["loss_per_step"]) == 2
    assert "stand-in demo model" in info["note"] and info["versions"]["torch"]
    assert [ln for ln in lines if "step 2/2, mean reward" in ln]
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)

    # the saved adapter is the trained θ, on a fresh copy of the base
    fresh = PeftModel.from_pretrained(make_base_model(len(tok), eos_token_id=tok.eos_token_id,
                                                      pad_token_id=tok.pad_token_id), out / "adapter")
    trained = dict(model.named_parameters())
    for n, p in fresh.named_parameters():
        if "lora_" in n:
            assert torch.equal(p, trained[n]), n
    sd = torch.load(out / "optimizer.pt", weights_only=True)
    assert all(float(st["step"]) == 2 for st in sd["state"].values())
    assert sd["param_groups"][0]["weight_decay"] == 0.01

    if HAVE_LOADING:
        from entropy_core.loading import load_adam_optimizer_from_path
        for n, p in fresh.named_parameters():
            p.requires_grad_("lora_" in n)
        opt = load_adam_optimizer_from_path(fresh, out / "optimizer.pt")
        assert len(opt.state) == sum(1 for n, _ in fresh.named_parameters() if "lora_" in n)
        assert opt.param_groups[0]["lr"] == 1e-3 and opt.param_groups[0]["weight_decay"] == 0.01

    # second call: nothing recomputed (a model that cannot even load is never touched)
    lines.clear()
    mtime = (out / "demo.json").stat().st_mtime_ns
    assert make_demo_checkpoint(out, base="/nonexistent/base", **kw) == out
    assert (out / "demo.json").stat().st_mtime_ns == mtime and lines == [f"demo checkpoint: {out} is complete, reusing it"]


@pytest.mark.skipif(not HAVE_LOADING, reason="entropy_core/loading.py is not there yet")
def test_load_adam_optimizer_accepts_the_demo_state(tmp_path, dataset):
    from entropy_core.loading import load_adam_optimizer_from_path
    model, tok = tiny_policy()
    out = make_demo_checkpoint(tmp_path / "c", steps=1, B_U=2, G=2, max_new_tokens=6, dataset=dataset,
                               reward=length_reward, model_and_tokenizer=(model, tok), log=lambda s: None)
    opt = load_adam_optimizer_from_path(model, out / "optimizer.pt")
    saved = torch.load(out / "optimizer.pt", weights_only=True)
    for idx, p in enumerate(opt.param_groups[0]["params"]):
        torch.testing.assert_close(opt.state[p]["exp_avg"], saved["state"][idx]["exp_avg"], rtol=0, atol=0)


def test_demo_refuses_a_foreign_directory_and_names_degenerate_steps(tmp_path, dataset):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("not a checkpoint")
    with pytest.raises(FileExistsError, match="demo.json"):
        make_demo_checkpoint(tmp_path / "busy", model_and_tokenizer=tiny_policy(), dataset=dataset)
    with pytest.raises(DegenerateGroupsError, match=r"demo checkpoint step 1/2: 2 of 2 update groups"):
        make_demo_checkpoint(tmp_path / "d", steps=2, B_U=2, G=2, max_new_tokens=4, dataset=dataset,
                             reward=lambda t, g: 0.0, model_and_tokenizer=tiny_policy(), log=lambda s: None)
    assert not (tmp_path / "d").exists()


def test_shaped_reward():
    good = " 3 + 4 = 7 </think> <answer> 7 </answer>"
    assert gsm8k_tag_shaped(good, "7") == 1.0
    assert gsm8k_tag_shaped(" x </think> <answer> 8 </answer>", "7", format_weight=0.1) == 0.1
    assert gsm8k_tag_shaped("no numbers here", "7") == 0.0
    near, far = gsm8k_tag_shaped("so 1,000 then 70", "72"), gsm8k_tag_shaped("so 1,000", "72")
    assert 0 < far < near < 0.05


@pytest.mark.slow
def test_demo_checkpoint_on_smollm2(tmp_path):
    from entropy_core.loading import load_adam_optimizer_from_path, load_peft_for_probe
    out = make_demo_checkpoint(tmp_path / "smol", steps=1, B_U=2, G=2, max_new_tokens=16)
    info = json.loads((out / "demo.json").read_text())
    assert info["base"] == "smollm2_135m" and len(info["rewards_per_step"][0]) == 4
    model, tok = load_peft_for_probe("smollm2_135m", out / "adapter")
    opt = load_adam_optimizer_from_path(model, out / "optimizer.pt")
    assert len(opt.state) == info["trainable_tensors"]
    assert all(float(st["step"]) == 1 for st in opt.state.values())
    # the loaded demo adapter samples a small E batch and teacher forcing reproduces its log-probs
    from entropy_core.data import load_dataset_split
    from entropy_core.sequences import SequenceProcessor
    proc = SequenceProcessor(model, tok, max_new_tokens=12, temperature=1.0)
    e = proc.sample_E(load_dataset_split("gsm8k_r1_template", "test", limit=20), 3, seed=0)
    scores = proc.teacher_force(e).per_sequence()
    assert torch.isfinite(scores.H).all() and (scores.T >= 1).all()
    torch.testing.assert_close(scores.S, e.logq, rtol=0, atol=1e-3)   # float32, summed over ≤ 12 tokens
