#!/usr/bin/env bash
# Everything only a GPU can check, in one call on a lent GPU machine (H100/H200 with torch + CUDA):
#   1. build tsv_fast._C for the card (sm_90) with that machine's torch and nvcc
#   2. run every CUDA test against its CPU twin (pytest -k cuda over the suites that have them)
#   3. the GPU benchmarks: TSV-M on ViT-L/14 (T=20, all 24 blocks; (a) timed on REF_BLOCKS blocks and
#      scaled) and ViT-B/32 (T=8), each route side by side with the reference (a); the stage
#      breakdown of one ViT-L/14 merge; the Gram matrices' block form (stage gram) and the polar
#      factor's Newton–Schulz forms (stage polar); where exact differs from float64 (stage diag); the
#      batched eigensolver and the segmented apply kernels
#
# From a session with a device:   make gpu-wheels   (once, here: open_clip is not on the GPU image)
#   then run:  bash scripts/gpu_check.sh   with carry ["build/wheels"]; results land in $OUT.
# The whole script keeps to BUDGET seconds (each stage gets at most its own limit and what is
# left), so a slow stage cannot eat the lease; the last lines printed are the summary tables.
set -u
OUT="${OUT:-results/gpu}"
PY="${PY:-python3}"
BUDGET="${BUDGET:-460}"
REF_BLOCKS="${REF_BLOCKS:-2}"
STAGES="${STAGES:-tests cholqr diag b32 l14 stages profile eigh segmented}"  # which of the stages below to run
L14_TASKS="${L14_TASKS:-20}"                     # e.g. "20 14"
# L14X_TASKS="6 4": further T for ViT-L/14 (stage l14x, after the others)
# Variants measured against d (BENCHMARKS.md), each the state before or a candidate (session 11
# measured batch2g, jacobi512/1024, start-rr, rr-tol0, ns-gemm: all now settled):
#   jacobi256: 256 threads per Rayleigh–Ritz matrix (before session 11; now 512 above ℓ = 80);
#   jacobi1024: 1024 threads; batch8g: 8 GiB shape batches; minp4: ≥ 4 products per step;
#   ell-k10: ℓ = k + 10 (same time as 2k in session 7, before the launch cuts);
#   cubic-ns: Newton–Schulz without session 12's Newton start (session 13: 1.19 s against 1.13);
#   ortho2: two CholeskyQR passes between filters (before session 13); ell-k25: ℓ = k + 25 (4% faster
#   in session 7, its peak fixed since, not timed again); trsm-inverse: L⁻¹ by one batched solve (before session 13);
#   cholqr-library: CholeskyQR's R⁻¹ by cholesky_ex + solve_triangular (before session 16's fused op);
#   e / e-os10: randomized with oversampling max(10, k/2) (session 17) / 10 (before; 0.83 s in session 7)
L14_VARIANTS="${L14_VARIANTS:-d,cholqr-library,trsm-inverse,ortho2,cubic-ns,e,e-os10}"
# route-share6: eigh per matrix while 6ℓ > q (before session 11; measured at T = 4–6 then)
L14X_VARIANTS="${L14X_VARIANTS:-d,route-subspace,route-share6}"
B32_VARIANTS="${B32_VARIANTS:-d,cubic-ns,rcond-old,e}"  # rcond-old: the whitening cut before session 7 (BENCHMARKS.md)
B32_BASELINES="${B32_BASELINES:-}"                # --no-baselines skips (b) and CuPy's (c)
# B32_TRUTH (default 4: every block (a) runs on): blocks checked against the float64 ground truth (CPU)
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"  # absolute: the benchmark stages run in benchmarks/
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" OMP_WAIT_POLICY=PASSIVE PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build, without a pip install there
deadline=$(( $(date +%s) + BUDGET ))
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader

# stage LIMIT LOG CMD...: run CMD under min(LIMIT, time left) seconds, output into $OUT/LOG
stage() {
    local limit=$1 log=$2; shift 2
    [[ " $STAGES " == *" ${log%%.*} "* || " $STAGES " == *" ${log%%_*} "* ]] || return 0
    local left=$(( deadline - $(date +%s) ))
    (( left < limit )) && limit=$left
    if (( limit < 10 )); then echo "$log: skipped, out of time" | tee "$OUT/$log"; return; fi
    local t0=$(date +%s)
    timeout "$limit" "$@" > "$OUT/$log" 2>&1
    echo "$log: rc $? in $(( $(date +%s) - t0 )) s (limit $limit s)"
}

if ! "$PY" -c "import open_clip" 2>/dev/null && ls build/wheels/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install --quiet --no-index --no-deps build/wheels/*.whl > /tmp/wheels.log 2>&1
fi

start=$(date +%s)
"$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
"$PY" -c "import tsv_fast; print(tsv_fast.backend())" | tee -a "$OUT/build.log"

stage 110 tests.log "$PY" -m pytest -q -p no:cacheprovider -k "cuda or gpu" --tb=short \
    tests/test_ops.py tests/test_eigh.py tests/test_cholesky_inverse.py tests/test_segmented.py tests/test_merge.py tests/test_solvers.py \
    tests/test_batching.py tests/test_runtime.py
grep -sE "^(FAILED|E   |[0-9]+ (passed|failed))" "$OUT/tests.log" | cut -c1-300 | head -40
cd benchmarks || exit 1
stage 100 diag.md "$PY" diagnose_exact.py --model ViT-B-32 --tasks 8 --blocks 12 --check-blocks 4 --device cuda
stage "${B32_LIMIT:-110}" b32.md "$PY" bench_merge.py --model ViT-B-32 --tasks 8 --blocks 12 --ref-blocks 4 --truth-blocks "${B32_TRUTH:-4}" --repeat 2 \
    --device cuda --variants "$B32_VARIANTS" $B32_BASELINES
stage 170 l14.md "$PY" bench_merge.py --model ViT-L-14 --tasks $L14_TASKS --blocks 24 --ref-blocks "$REF_BLOCKS" --truth-blocks 1 \
    --repeat 3 --device cuda --no-baselines --variants "$L14_VARIANTS"
stage 80 stages.md "$PY" bench_stages.py --model ViT-L-14 --tasks "${L14_TASKS%% *}" --device cuda
stage 60 profile.md "$PY" bench_stages.py --model ViT-L-14 --tasks "${L14_TASKS%% *}" --device cuda --profile 30
stage 30 cholqr.md "$PY" bench_cholqr.py --device cuda --batch 80 --sizes 102 146 --threads 0 128 512 1024  # fused R⁻¹
stage 30 gram.md "$PY" bench_gram.py --device cuda --shapes 480x3072x1024 480x1024x1024 --blocks 2 4 8  # Gram blocks
stage 60 polar.md "$PY" bench_polar.py --device cuda --shapes 1024x1024:20 4096x1024:20 --batch 2  # Newton–Schulz forms
[[ -n "${L14X_TASKS:-}" ]] && stage "${L14X_LIMIT:-150}" l14x.md "$PY" bench_merge.py --model ViT-L-14 --tasks $L14X_TASKS --blocks 24 \
    --ref-blocks "$REF_BLOCKS" --repeat 2 --device cuda --no-baselines --variants "$L14X_VARIANTS"  # more T, no float64 truth
stage 40 eigh.md bash -c "$PY bench_eigh.py --device cuda --batch 90 --sizes 64 102 118 --threads 0 512 1024 &&
    $PY bench_eigh.py --device cuda --batch 90 --sizes 102 --threads 0 512 1024 --kind nearly-diagonal &&
    $PY bench_eigh.py --device cuda --batch 379 --sizes 102 --threads 0 512 1024 --kind nearly-diagonal"  # whole-shape chunks
stage 30 segmented.md "$PY" bench_segmented.py --device cuda
cd ..
for f in diag l14 stages profile gram polar b32 l14x eigh segmented; do
    [[ -f "$OUT/$f.md" ]] || continue
    echo "== $f"; grep -E '^(\||#|merge_layers|profiled|\(a\)|Newton|Worst|- )' "$OUT/$f.md" || tail -5 "$OUT/$f.md"
    grep -q Traceback "$OUT/$f.md" && tail -8 "$OUT/$f.md"
done
