"""Worker of tests/test_distributed.py: one rank of a measurement split across torch.distributed ranks.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 tests/dist_worker.py --out DIR --vector V

Every rank builds the same tiny float64 Qwen2 + LoRA with a stepped AdamW state (tests/test_update.py's
`stepped`), the same batches U and E (`batches()`), and runs, with gloo on CPU:
  * the update vector, U split by prompt group (contiguous and strided), and with each rank holding only
    its own groups (local mode);
  * ΔĤ(η), Ĥ(θ), the exact / variance-reduced / finite-difference slopes and the curvature with their
    jackknife standard errors along the single-process v (--vector), E split contiguous, strided, held
    locally per rank, and with packed microbatches; and once end to end along the distributed v;
  * its share of a sampled E (`sample_E_shard`), input ids and global rows saved for the test.
It writes DIR/rank<r>.json (every number, by case) and DIR/rank<r>.safetensors (v per case, sampled rows).
The test computes the same numbers in one process with the plain library calls and compares.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import safetensors.torch
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))           # tiny.py, test_update.py

from entropy_core import distributed as D  # noqa: E402
from entropy_core.data.datasets import Example  # noqa: E402
from entropy_core.sequences import SequenceProcessor  # noqa: E402
from test_update import stepped  # noqa: E402
from tiny import make_base_model, make_tokenizer, random_batch  # noqa: E402

ETAS = [1e-3, -2e-3]
FD_STEP = 5e-4
MICROBATCH = 1             # one row per forward: a row's arithmetic is then the same in a shard and in one process
PACKED_MICROBATCH = 2      # rows packed two at a time: shards pack other pairs than one process (round-off only)
SAMPLE_SEED, SAMPLE_B_E = 5, 5


def batches() -> tuple[dict, dict]:
    """U: 3 prompt groups of sizes 2, 3, 2 (uneven over 2 ranks); E: 7 sequences of mixed lengths."""
    U = random_batch(64, 7, [3, 5], [4, 6, 2], seed=3)
    U["group"] = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    U["advantages"] = torch.tensor([0.5, -0.5, 1.0, -0.4, -0.6, 0.2, -0.2], dtype=torch.float64)
    E = random_batch(64, 7, [3, 5, 4], [4, 6, 2, 5], seed=11)
    return U, E


def model_and_optimizer():
    model, opt, _, _ = stepped(torch.float64, amsgrad=False)          # m, s, t₀ all non-trivial
    return model, opt


def summary(td, lin) -> dict[str, float]:
    """Every number of a measurement (values and standard errors), flat, for exact comparison."""
    out = {"H_base": td.H_base.value, "H_base_se": td.H_base.se, "ess_proposal": td.ess_proposal}
    for p in td.points:
        for k in ("delta_h", "se", "H_eta", "ess", "logw_min", "logw_median", "logw_max"):
            out[f"eta={p.eta!r}.{k}"] = getattr(p, k)
    for k in ("slope_exact", "slope_vr", "slope_fd", "curvature", "curvature_fd"):
        out[k], out[f"{k}_se"] = getattr(lin, k).value, getattr(lin, k).se
    return out


def sampling_setup():
    """A tokenizer, a tiny float32 policy with its vocabulary, a processor and 4 prompts."""
    tok = make_tokenizer()
    torch.manual_seed(0)
    model = make_base_model(len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    proc = SequenceProcessor(model, tok, max_new_tokens=4, stop=None, batch_size=8)
    examples = [Example(question=f"q{i}", answer=str(i), prompt=f"Tom has {i} apples.", index=i, source="test")
                for i in range(4)]
    return proc, examples


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--vector", required=True, help="safetensors file of the single-process update vector")
    args = ap.parse_args()
    out = Path(args.out)
    torch.set_num_threads(1)
    rank, world = D.init_distributed("gloo")
    assert world > 1, "run me under torchrun"
    model, opt = model_and_optimizer()
    U, E = batches()
    v_one = safetensors.torch.load_file(args.vector)                     # E-side cases measure along the same v
    numbers, tensors = {}, {}

    def measure(case, batch, v, *, microbatch_size=MICROBATCH, **kw):
        td = D.distributed_true_delta(model, batch, v, ETAS, microbatch_size=microbatch_size, **kw)
        lin = D.distributed_linear_estimates(model, batch, v, quadratic=True, variance_reduced=True,
                                             fd_step=FD_STEP, microbatch_size=microbatch_size, **kw)
        numbers[f"measure/{case}"] = summary(td, lin)

    def update(case, batch, **kw):
        res = D.distributed_update_vector(model, opt, batch, microbatch_size=PACKED_MICROBATCH, **kw)
        tensors.update({f"v/{case}/{n}": t for n, t in res.vector.items()})
        numbers[f"update/{case}"] = {k: res.stats[k] for k in ("loss", "num_sequences", "tokens", "norm")}
        return res.vector

    # U split by prompt group: the whole batch on every rank, or each rank holding only its own groups
    v_dist = update("contiguous", U, shard="contiguous")
    update("strided", U, shard="strided")
    update("local", D.take_rows(U, D.shard_groups(U["group"], mode="strided")), local=True)
    # E split by rows, along the single-process v
    measure("contiguous", E, v_one, shard="contiguous")
    measure("strided", E, v_one, shard="strided")
    rows = D.shard_rows(E["input_ids"].shape[0], mode="strided")
    measure("local", D.take_rows(E, rows), v_one, index=rows)
    measure("packed", E, v_one, microbatch_size=PACKED_MICROBATCH)
    # end to end: the distributed v, packed microbatches
    measure("end_to_end", E, v_dist, microbatch_size=PACKED_MICROBATCH)
    # sampling: this rank's share of E, seeded per rank
    proc, examples = sampling_setup()
    batch, index, n = D.sample_E_shard(proc, examples, SAMPLE_B_E, seed=SAMPLE_SEED)
    tensors.update({"sample/input_ids": batch.input_ids, "sample/index": index})
    numbers["sample"] = {"n": n, "rank_seed": D.rank_seed(SAMPLE_SEED)}
    numbers["broadcast"] = D.broadcast_text("ΔĤ from rank 0" if rank == 0 else None)
    # work only rank 0 does: its result, or its error, on every rank
    numbers["rank0"] = D.run_on_rank0(lambda: {"computed_by": rank}, encode=dict, decode=dict)
    try:
        D.run_on_rank0(lambda: 1 / 0, encode=float, decode=float)
    except (ZeroDivisionError, D.RankZeroError) as e:
        numbers["rank0_error"] = f"{type(e).__name__}: {e}"
    out.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({k: t.contiguous() for k, t in tensors.items()}, str(out / f"rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "world": world, **numbers}))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
