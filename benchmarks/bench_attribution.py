"""Cost of per-sequence attribution (DESIGN §1.6) in forward-pass equivalents, against the per-sequence
approach (one gradient per U sequence), side by side on one small random model in one run.

    python benchmarks/bench_attribution.py                 # writes benchmarks/results/attribution-<time>.json

A forward-pass equivalent is the wall time of one no-grad teacher-forced pass over the same batch
(E for the E side, U for the U side), measured in the same process. Median of `--repeats` runs.
The per-sequence approach makes B_U·G backward passes of one sequence each and holds B_U·G gradient
vectors (at the seed's scale, 512 × 73.9M float64 ≈ 300 GB); on a 2-core CPU its time is FLOP-bound and
so close to one batched pass, on a GPU it is bound by the number of passes.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from entropy_core.estimators.attribution import _shares, surrogate_gradients  # noqa: E402
from entropy_core.params import dot_named, get_trainable_named  # noqa: E402
from entropy_core.scoring import score_tokens  # noqa: E402
from entropy_core.update import compute_update_vector, drgrpo_coefficients  # noqa: E402
from tiny import add_lora, make_base_model, random_batch  # noqa: E402


def timed(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2000)
    ap.add_argument("--B-E", type=int, default=32)
    ap.add_argument("--B-U", type=int, default=8)
    ap.add_argument("--G", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    model = add_lora(make_base_model(a.vocab, hidden=a.hidden, layers=a.layers, dtype=torch.float32),
                     r=8, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    params = list(get_trainable_named(model).values())
    n_u = a.B_U * a.G
    u = random_batch(a.vocab, n_u, [20, 40, 30], [30, 60, 45, 50], seed=1)
    u["group"] = torch.arange(n_u) // a.G
    u["advantages"] = torch.randn(n_u, dtype=torch.float64)
    u["advantages"] -= u["advantages"].view(a.B_U, a.G).mean(-1).repeat_interleave(a.G)
    e = random_batch(a.vocab, a.B_E, [20, 40, 30], [30, 60, 45, 50], seed=2)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    for _ in range(2):                                  # real optimizer state
        opt.zero_grad()
        sum(p.pow(2).sum() for p in params).backward()
        opt.step()
    opt.zero_grad()
    upd = compute_update_vector(model, opt, u, microbatch_size=8)
    E = (e["input_ids"], e["attention_mask"], e["response_mask"])
    U = (u["input_ids"], u["attention_mask"], u["response_mask"])
    t_e, theta = timed(lambda: score_tokens(model, *E, microbatch_size=8), a.repeats)
    t_u, _ = timed(lambda: score_tokens(model, *U, microbatch_size=8), a.repeats)
    coef = drgrpo_coefficients(u["advantages"], u["group"], u["response_mask"].sum(-1))
    rows = {}
    for name, vr in (("exact", False), ("exact+vr", True)):
        t_es, (uk, zk, *_rest) = timed(lambda: surrogate_gradients(model, e, theta, groups=0, variance_reduced=vr,
                                                                   microbatch_size=8), a.repeats)
        dirs = uk + (zk or [])
        t_us, _ = timed(lambda: _shares(model, u, upd, dirs, coef, 1.0, 8), a.repeats)
        rows[name] = {"E_seconds": t_es, "U_seconds": t_us, "E_forward_equivalents": t_es / t_e,
                      "U_forward_equivalents": t_us / t_u}
    # the per-sequence approach: one backward per U sequence for v_i, then ⟨u, v_i⟩
    t_ps, res = timed(lambda: compute_update_vector(model, opt, u, components=True), a.repeats)
    g = {n: sum(x[n] for x in uk) for n in uk[0]}
    c_ps = torch.tensor([float(dot_named(g, {n: res.per_sequence[n][i] for n in g})) for i in range(n_u)])
    c_fast = _shares(model, u, upd, uk, coef, 1.0, 8)[0]
    n_params = sum(p.numel() for p in params)
    rows["per_sequence"] = {"U_seconds": t_ps, "U_forward_equivalents": t_ps / t_u, "U_passes": n_u,
                            "gradient_memory_bytes": n_u * n_params * 8,
                            "max_rel_diff_vs_two_pass": float((c_fast - c_ps).abs().max() / c_ps.abs().max())}
    for name, vr in (("exact", False), ("exact+vr", True)):
        rows[name].update(E_passes=1 + int(vr), U_passes=1 + int(vr), gradient_memory_bytes=(1 + int(vr)) * n_params * 8)
    out = {"model": {"hidden": a.hidden, "layers": a.layers, "vocab": a.vocab,
                     "trainable": sum(p.numel() for p in params)},
           "batches": {"B_E": a.B_E, "B_U": a.B_U, "G": a.G}, "forward_seconds": {"E": t_e, "U": t_u},
           "attribution": rows, "torch": torch.__version__, "threads": torch.get_num_threads()}
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"attribution-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"{'path':<14}{'E fwd-eq':>10}{'U fwd-eq':>10}{'U passes':>10}{'grad MB':>10}")
    for k, r in rows.items():
        print(f"{k:<14}{r.get('E_forward_equivalents', float('nan')):>10.2f}{r['U_forward_equivalents']:>10.2f}"
              f"{r['U_passes']:>10}{r['gradient_memory_bytes'] / 2**20:>10.1f}")
    print(f"per-sequence vs two-pass shares: max relative difference {rows['per_sequence']['max_rel_diff_vs_two_pass']:.1e}")
    print(path)


if __name__ == "__main__":
    main()
