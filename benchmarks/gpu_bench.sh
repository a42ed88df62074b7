#!/usr/bin/env bash
# Stage timings at the seed's scale on a lent H100/H200, in one prepared run of ≈ 5½ minutes (≤ 7.7 at the timeouts).
#
# What it runs: benchmarks/bench_stages.py on a random-weight model of the real Qwen2.5-1.5B shape
# (hidden 1536, 28 layers, 12/2 heads, intermediate 8960, vocab 151936; LoRA r=64 on q,k,v,o,gate,up,down),
# float32 with TF32 off, real GSM8K R1-template prompt lengths, responses up to 150 new tokens.
# E has the seed's B_E=2048 rows (so its padded layout, which the straightforward path pays for, is the
# seed's), laid out like GSM8K R1 (bench_stages' defaults for gsm8k_r1: 83 template tokens every prompt
# begins with, prompts drawn with replacement from 1319, so scoring and the JVPs share prompt tokens);
# the E stages run on 256 of them and are extrapolated linearly (column "extrap s"; a 256-row subset
# keeps few of the repeated prompts, so this understates the sharing). U is
# measured at 32x8 and extrapolated to 64x8. Sampling uses 256 prompts per generate call (HF keeps logits
# and scores of every step: 2·150·256·151936·4 B ≈ 47 GB; 56 GiB peak on an H100, 1.2x faster than 128).
# The straightforward one-sequence-at-a-time path is timed against the fast path on 32 rows of the same
# E (full padded width) and 4 U groups. The nested JVP (curvature) runs last: on 256 rows it took 61 s
# on an H100, and the whole script ≈ 4 minutes.
# Stages past --time-budget are skipped (recorded), and the JSON is rewritten after every stage, so a
# run cut short by the timeout still leaves its measurements. Then the same shape in float64, θ and η
# passes only on 256 rows: what the fp64 runtime mode costs against fp32 on this card; and the θ pass
# on unrelated prompts, to compare with shared ones.
#
# Needs only torch, transformers, peft, safetensors (the repo is copied to the machine; math_verify,
# which the benchmark never uses, is stubbed when missing).
#
# Usage:
#   bash benchmarks/gpu_bench.sh                  # on the GPU; JSON to $OUT if set, else benchmarks/results
#   DRY_RUN=1 bash benchmarks/gpu_bench.sh        # CPU dry run of the same script with --shape tiny (≈ 30 s)
#   DTYPE=float64 bash benchmarks/gpu_bench.sh    # the same in float64
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-benchmarks/results}
DTYPE=${DTYPE:-float32}

if [[ "${DRY_RUN:-0}" == 1 || "${1:-}" == "--dry-run" ]]; then
  ARGS=(--shape tiny --device cpu --threads 1 --B-E 2048 --measure-rows 32 --B-U 4 --target-B-U 64 --G 8
        --prompt-len gsm8k_r1 --new-tokens 24 --gen-batch 16 --straightforward-rows 8 --time-budget 120)
  LIMIT=300
else
  nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader || true
  ARGS=(--shape qwen2_5_1_5b --device cuda --B-E 2048 --measure-rows 256 --B-U 32 --target-B-U 64 --G 8
        --prompt-len gsm8k_r1 --new-tokens 150 --gen-batch 256 --straightforward-rows 32 --time-budget 240)
  LIMIT=330
fi

# TF32 stays off inside bench_stages (apply_global_precision, DESIGN §2.1); expandable segments make
# the allocator cope with the varying microbatch shapes.
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
rc=0     # a run cut by its timeout still wrote its JSON; go on to the float64 comparison, exit with its status
timeout --signal=TERM --kill-after=10 "$LIMIT" \
  "$PY" benchmarks/bench_stages.py "${ARGS[@]}" --dtype "$DTYPE" --out "$OUT_DIR" || rc=$?
if [[ "$DTYPE" == float32 && "${SKIP_FP64:-0}" != 1 ]]; then
  timeout --signal=TERM --kill-after=10 $((LIMIT / 4)) \
    "$PY" benchmarks/bench_stages.py "${ARGS[@]}" --stages theta,eta --time-budget 60 \
      --dtype float64 --out "$OUT_DIR"
fi
# the θ pass on unrelated prompts (no template, no repeats): what shared prompts gain on this card
timeout --signal=TERM --kill-after=5 45 \
  "$PY" benchmarks/bench_stages.py "${ARGS[@]}" --stages theta --time-budget 30 --shared-prefix 0 \
    --prompt-pool 0 --dtype "$DTYPE" --out "$OUT_DIR" || true
exit $rc
