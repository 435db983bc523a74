#!/usr/bin/env bash
# The GPU measurements to take when a GPU is lent (bench/README.md, "To run when a GPU is lent").
#
#   bash bench/gpu_session.sh [OUT_DIR]        # from the repository root; about 8 minutes in all
#
# Everything goes to OUT_DIR/gpu_session.md (default: $OUT if set, else bench_gpu_out/). Each part has its own
# time limit and prints its rows as they are measured, so a part cut short keeps what it has, and the parts
# come in order of value: the CUDA tests, the eager table, the compiled rows, the data-loader rows.
set -u
cd "$(dirname "$0")/.."
DEST=${1:-${OUT:-bench_gpu_out}}
mkdir -p "$DEST"
LOG="$DEST/gpu_session.md"
: > "$LOG"
T0=$(date +%s)

part() {  # part SECONDS TITLE COMMAND...
    local limit=$1 title=$2
    shift 2
    local t=$(date +%s)
    printf '\n## %s\n\n`%s` (limit %s s)\n\n' "$title" "$*" "$limit" >> "$LOG"
    timeout --signal=INT --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
    local rc=$?
    printf '\n(exit %s after %s s%s)\n' "$rc" "$(( $(date +%s) - t ))" \
        "$([ "$rc" = 124 ] || [ "$rc" = 130 ] && echo ': time limit, rows above are complete')" >> "$LOG"
}

{
    echo "# GPU session $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, \
'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NONE')" 2>&1
    echo "host: $(nproc) cores, git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
} >> "$LOG"

# 1. The tests that are skipped without CUDA, plus the model-level compile equality tests (~1-2 min).
part 120 "CUDA-only tests" env GEOMASK3D_COMPILE_TESTS=1 python -m pytest -q -x tests/test_host_sync.py tests/test_compile.py

# 2. Eager steps: Point-MAE, GM3D, Point-M2AE at batch 32 / 128 / 256, fp32 and bf16; the official
#    formulation at batch 32 for the speed-up column (~2.5 min).
part 170 "Eager pre-training steps" python bench/pretrain_step.py --device cuda --configs paper gm3d m2ae \
    --batches 32 128 256 --precisions fp32 bf16 --repeats 10 --warmup 3 --pipelined

# 3. torch.compile (inductor) against eager at batch 128, bf16 first, then fp32 (~3 min: most of it is
#    the compilation, reported per row on the log's stderr lines).
part 110 "Compiled vs eager, bf16, batch 128" python bench/pretrain_step.py --device cuda \
    --configs paper gm3d m2ae --batches 128 --precisions bf16 --modes eager compiled --no-baseline --pipelined \
    --repeats 10 --warmup 3
part 70 "Compiled vs eager, fp32, batch 128 and 256 (Point-MAE)" python bench/pretrain_step.py --device cuda \
    --configs paper --batches 128 256 --precisions fp32 --modes eager compiled --no-baseline \
    --repeats 10 --warmup 3

# 4. The data readers on this host's disk and cores (~1 min).
part 50 "Data readers (per-file vs packed)" python bench/data_loader.py --shapes 4000 --repeats 2

printf '\nTotal %s s.\n' "$(( $(date +%s) - T0 ))" >> "$LOG"
echo "wrote $LOG"
