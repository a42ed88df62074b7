"""Tiny real models for the CPU tests: a BPE tokenizer trained in milliseconds and a random Qwen2.

Everything here is a real transformers / peft / tokenizers object, only small. Tests import these
builders directly (they are plain functions, not fixtures, so a test can ask for several variants).
"""
from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from entropy_core.precision import keep_norms_in_dtype

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _corpus(n: int = 300) -> list[str]:
    g = torch.Generator().manual_seed(0)
    lines = []
    for _ in range(n):
        a, b = torch.randint(1, 50, (2,), generator=g).tolist()
        lines.append(f"Question: Tom has {a} apples and buys {b} more. How many? "
                     f"<think> {a} + {b} = {a + b} </think> <answer> {a + b} </answer> #### {a + b}")
    return lines


def make_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """Byte-level BPE with ChatML specials; pad = <|endoftext|>, eos = <|im_end|>, left padding."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(_corpus(), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=["<|im_start|>"], chat_template=CHATML_TEMPLATE)
    tok.padding_side = "left"
    return tok


def make_base_model(vocab_size: int, *, hidden: int = 32, layers: int = 2, eos_token_id: int = 2,
                    pad_token_id: int = 0, seed: int = 0, dtype: torch.dtype = torch.float32) -> Qwen2ForCausalLM:
    """Random Qwen2ForCausalLM (RoPE, GQA) of the given vocabulary size, in eval mode."""
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=None,
                      eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    model = Qwen2ForCausalLM(cfg).to(dtype).eval()
    keep_norms_in_dtype(model)            # float64 really float64 (HF RMSNorm computes in float32)
    return model


def add_lora(model, *, r: int = 4, targets=("q_proj", "v_proj"), seed: int = 1, b_std: float = 0.05):
    """Attach a peft LoRA adapter; lora_B gets small random values so the adapter is not the identity
    (a fresh adapter has B = 0, which makes every gradient w.r.t. A vanish)."""
    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                          target_modules=list(targets), task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * b_std)
    return pm.eval()


def make_lora_model(vocab_size: int = 64, *, dtype: torch.dtype = torch.float64, seed: int = 0, **kw):
    """Tiny Qwen2 + LoRA(q, v) in the requested dtype."""
    return add_lora(make_base_model(vocab_size, seed=seed, dtype=dtype), **kw)


def random_batch(vocab_size: int, n: int, prompt_lens, resp_lens, *, eos_token_id: int = 2,
                 pad_token_id: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
    """Left-padded prompts then responses then right padding, as BatchedSequences lays them out.

    Returns input_ids, attention_mask, response_mask (N, L) int64; tokens avoid the pad and eos ids.
    """
    g = torch.Generator().manual_seed(seed)
    P, R = max(prompt_lens), max(resp_lens)
    L = P + R
    ids = torch.full((n, L), pad_token_id, dtype=torch.long)
    am = torch.zeros((n, L), dtype=torch.long)
    rm = torch.zeros((n, L), dtype=torch.long)
    for i in range(n):
        p, r = prompt_lens[i % len(prompt_lens)], resp_lens[i % len(resp_lens)]
        toks = torch.randint(3, vocab_size, (p + r,), generator=g)
        ids[i, P - p:P + r] = toks
        am[i, P - p:P + r] = 1
        rm[i, P:P + r] = 1
    return {"input_ids": ids, "attention_mask": am, "response_mask": rm}
