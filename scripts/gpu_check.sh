#!/usr/bin/env bash
# Everything only a GPU can check, in one call on a lent GPU machine (H100/H200 with torch + CUDA):
#   1. build tsv_fast._C for the card (sm_90) with that machine's torch and nvcc
#   2. run every CUDA test against its CPU twin (pytest -k cuda over the suites that have them)
#   3. the GPU benchmarks: TSV-M on ViT-B/32 (T=8) and ViT-L/14 (T=20), each route side by side
#      with the reference (a), plus the batched eigensolver and the segmented apply kernels
#
# From a session with a device:   make gpu-wheels   (once, here: open_clip is not on the GPU image)
#   then run:  bash scripts/gpu_check.sh   with carry ["build/wheels"]; results land in $OUT.
# Each stage has its own time limit (STAGE_LIMIT seconds) so one slow stage cannot eat the lease;
# the last lines printed are the summary tables.
set -u
OUT="${OUT:-results/gpu}"
PY="${PY:-python3}"
STAGE_LIMIT="${STAGE_LIMIT:-240}"
BLOCKS_L14="${BLOCKS_L14:-24}"
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" OMP_WAIT_POLICY=PASSIVE
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

if ! "$PY" -c "import open_clip" 2>/dev/null && ls build/wheels/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install --quiet --no-index --no-deps build/wheels/*.whl > "$OUT/wheels.log" 2>&1
fi

start=$(date +%s)
"$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
"$PY" -c "import tsv_fast; print(tsv_fast.backend())" | tee -a "$OUT/build.log"

timeout "$STAGE_LIMIT" "$PY" -m pytest -q -p no:cacheprovider -k "cuda or gpu" \
    tests/test_ops.py tests/test_eigh.py tests/test_segmented.py tests/test_merge.py tests/test_solvers.py \
    tests/test_batching.py tests/test_runtime.py > "$OUT/pytest_cuda.log" 2>&1
echo "cuda tests: rc $? -- $(tail -1 "$OUT/pytest_cuda.log")"

cd benchmarks || exit 1
timeout "$STAGE_LIMIT" "$PY" bench_eigh.py --device cuda > "../$OUT/bench_eigh.md" 2>&1
timeout "$STAGE_LIMIT" "$PY" bench_segmented.py --device cuda > "../$OUT/bench_segmented.md" 2>&1
timeout "$STAGE_LIMIT" "$PY" bench_merge.py --model ViT-B-32 --tasks 8 --blocks 12 --repeat 3 --device cuda \
    --variants d,eigh,subspace,shape,key,ns,e,e-shape > "../$OUT/bench_merge_b32.md" 2>&1
timeout "$STAGE_LIMIT" "$PY" bench_merge.py --model ViT-L-14 --tasks 20 --blocks "$BLOCKS_L14" --repeat 2 \
    --device cuda --no-baselines --variants d,eigh,subspace,e > "../$OUT/bench_merge_l14.md" 2>&1
cd ..
for f in bench_eigh bench_segmented bench_merge_b32 bench_merge_l14; do
    echo "== $f"; grep '^|' "$OUT/$f.md" || tail -5 "$OUT/$f.md"
done
