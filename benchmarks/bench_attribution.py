"""Cost of per-sequence attribution (DESIGN §1.6) in forward-pass equivalents, against the per-sequence
approach (one gradient per U sequence), side by side on one small random model in one run.

    .venv/bin/python benchmarks/bench_attribution.py      # writes benchmarks/results/attribution-<time>.json

A forward-pass equivalent is the time of one no-grad teacher-forced pass over the same batch (E for
the E side, U for the U side; `score_tokens`, the fast path), run just before each timed run (so both
see the same machine state); fwd-eq is the median of the per-pair ratios. Times are this process's
CPU time with one thread (immune to other processes on a shared machine), after a warm-up; wall times
are kept in the JSON. Rows:
  exact          point estimate of the exact column alone: 1 forward + 1 backward over E, 1 direction over U
  exact+vr       both columns: 1 forward + 2 backwards over E; over U one forward + one backward (LoRA
                 weights are Linear weights: `_directional_S_reverse`), any number of directions; that
                 pass also gives the per-token S, H of U for the stage's table, so it is the stage's
                 whole work over U
  exact+vr+se    both columns with K-group error bars: 2 backwards over E and a third over its first
                 group (Y), 2K + 1 directions in the same U pass
  exact+vr/fwd   both columns, U by the general forward-mode pass (one jvp, 2 tangents vmapped, then a
                 no-grad pass for U's scores)
  per_sequence   B_U·G backward passes of one sequence each, then ⟨u, v_i⟩; holds B_U·G gradient vectors
                 (at the seed's scale, 512 × 73.9M float64 ≈ 300 GB). On a CPU its time is FLOP-bound
                 and so close to one batched pass; on a GPU it is bound by the number of passes.
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


def timed(fn, repeats, ref):
    """(median CPU seconds, median wall seconds, median ratio to `ref`'s CPU time, last result) after
    one warm-up call; each run of fn is paired with a run of ref just before it (interleaved, so both
    see the same machine state) and the ratio is taken per pair."""
    out = fn()
    cpu, wall, ratio = [], [], []
    for _ in range(repeats):
        c0 = time.process_time()
        ref()
        c1, w1 = time.process_time(), time.perf_counter()
        out = fn()
        cpu.append(time.process_time() - c1)
        wall.append(time.perf_counter() - w1)
        ratio.append(cpu[-1] / (c1 - c0))
    return statistics.median(cpu), statistics.median(wall), statistics.median(ratio), out


def rel_diff(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).abs().max() / ref.abs().max())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=4000)
    ap.add_argument("--B-E", type=int, default=64)
    ap.add_argument("--B-U", type=int, default=4)
    ap.add_argument("--G", type=int, default=4)
    ap.add_argument("--groups", type=int, default=8, help="K groups of E for the error bars (the config default)")
    ap.add_argument("--microbatch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = add_lora(make_base_model(a.vocab, hidden=a.hidden, layers=a.layers, dtype=torch.float32),
                     r=8, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    params = list(get_trainable_named(model).values())
    n_u, mb = a.B_U * a.G, a.microbatch
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
    upd = compute_update_vector(model, opt, u, microbatch_size=mb)
    E = (e["input_ids"], e["attention_mask"], e["response_mask"])
    U = (u["input_ids"], u["attention_mask"], u["response_mask"])
    def fwd_E():
        return score_tokens(model, *E, microbatch_size=mb)

    def fwd_U():
        return score_tokens(model, *U, microbatch_size=mb)

    t_e, w_e, _, theta = timed(fwd_E, a.repeats, lambda: None)
    t_u, w_u, _, _ = timed(fwd_U, a.repeats, lambda: None)
    coef = drgrpo_coefficients(u["advantages"], u["group"], u["response_mask"].sum(-1))
    n_params = sum(p.numel() for p in params)

    def shares(dirs, mode="auto"):       # the shares; the U scores the stage also takes from this pass are dropped
        return lambda: _shares(model, u, upd, dirs, coef, 1.0, mb, mode)[0]

    rows, grads, c = {}, {}, {}
    for name, vr, K in (("exact", False, 0), ("exact+vr", True, 0), ("exact+vr+se", True, a.groups)):
        t_es, w_es, r_es, (uk, zk, y, *_r) = timed(
            lambda: surrogate_gradients(model, e, theta, groups=K, variance_reduced=vr, microbatch_size=mb),
            a.repeats, fwd_E)
        grads[name] = uk + (zk or []) + ([y] if K else [])
        t_us, w_us, r_us, c[name] = timed(shares(grads[name]), a.repeats, fwd_U)
        rows[name] = {"E_seconds": t_es, "U_seconds": t_us, "E_wall_seconds": w_es, "U_wall_seconds": w_us,
                      "E_forward_equivalents": r_es, "U_forward_equivalents": r_us,
                      "E_forward_passes": 1, "E_backward_passes": 1 + int(vr) + (1 / K if K else 0),
                      "U_forward_passes": 1, "U_backward_passes": 1, "U_directions": len(grads[name]),
                      "gradient_memory_bytes": len(grads[name]) * n_params * 8}
    # both columns by the general forward-mode pass over U (any trainable parameters)
    t_fm, w_fm, r_fm, fm = timed(shares(grads["exact+vr"], "forward"), a.repeats, fwd_U)
    rows["exact+vr/fwd"] = dict(rows["exact+vr"], U_seconds=t_fm, U_wall_seconds=w_fm, U_forward_equivalents=r_fm,
                                U_backward_passes=0, U_forward_mode_passes=1, U_tangents=2)
    # the per-sequence approach: one backward per U sequence for v_i, then ⟨u, v_i⟩
    t_ps, w_ps, r_ps, res = timed(lambda: compute_update_vector(model, opt, u, microbatch_size=mb, components=True),
                                  a.repeats, fwd_U)
    g = grads["exact"][0]
    c_ps = torch.tensor([float(dot_named(g, {n: res.per_sequence[n][i] for n in g})) for i in range(n_u)])
    rows["per_sequence"] = {"U_seconds": t_ps, "U_wall_seconds": w_ps, "U_forward_equivalents": r_ps,
                            "U_forward_passes": n_u, "U_backward_passes": n_u,
                            "gradient_memory_bytes": n_u * n_params * 8}
    K = len(grads["exact+vr+se"]) // 2
    checks = {"per_sequence_vs_one_pass": rel_diff(c["exact"][0], c_ps),
              "forward_mode_vs_reverse": rel_diff(fm, c["exact+vr"]),
              "error_bar_run_vs_point_run": rel_diff(torch.stack([c["exact+vr+se"][:K].sum(0),
                                                                  c["exact+vr+se"][K:2 * K].sum(0)]), c["exact+vr"])}
    out = {"model": {"hidden": a.hidden, "layers": a.layers, "vocab": a.vocab, "trainable": n_params,
                     "dtype": "float32"},
           "batches": {"B_E": a.B_E, "B_U": a.B_U, "G": a.G, "groups": a.groups, "microbatch": mb},
           "forward_seconds": {"E": t_e, "U": t_u, "E_wall": w_e, "U_wall": w_u},
           "attribution": rows, "max_rel_diff": checks, "clock": "process CPU time; fwd-eq: median ratio to an interleaved forward",
           "torch": torch.__version__, "threads": torch.get_num_threads(), "repeats": a.repeats,
           "command": " ".join(["python benchmarks/bench_attribution.py",
                                *(argv if argv is not None else sys.argv[1:])])}
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"attribution-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"{'path':<14}{'E fwd-eq':>9}{'U fwd-eq':>9}{'E fwd+bwd':>10}{'U fwd+bwd+jvp':>14}{'dirs':>5}{'grad MB':>8}")
    for k, r in rows.items():
        u_passes = f"{r.get('U_forward_passes', 0)}+{r['U_backward_passes']}+{r.get('U_forward_mode_passes', 0)}"
        e_passes = f"{r.get('E_forward_passes', 0)}+{r.get('E_backward_passes', 0):g}"
        print(f"{k:<14}{r.get('E_forward_equivalents', float('nan')):>9.2f}{r['U_forward_equivalents']:>9.2f}"
              f"{e_passes:>10}{u_passes:>14}"
              f"{r.get('U_directions', n_u):>5}{r['gradient_memory_bytes'] / 2**20:>8.1f}")
    print("max relative differences: " + ", ".join(f"{k} {v:.1e}" for k, v in checks.items()))
    print(path)


if __name__ == "__main__":
    main()
