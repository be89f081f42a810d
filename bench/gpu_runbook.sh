#!/usr/bin/env bash
# The GPU checks of docs/benchmarks.md ("GPU targets"), as one script for the project's GPU
# machine: each step under its own time limit, its output and wall time logged, a summary at
# the end. Usage, from the repository root:
#
#   bench/gpu_runbook.sh LOG_DIR DATA_DIR [ARCHIVE.tar.gz]
#
# LOG_DIR gets one log per step and summary.tsv (step, exit code, wall seconds); DATA_DIR holds
# MNIST/raw (gzipped files are unpacked in place). Steps run in order of value; one that fails
# or runs out of time is recorded and the next one starts. With ARCHIVE, the logs are packed
# into it after every step (runs are kept out of LOG_DIR), so a call cut short keeps its logs.
set -u
LOG=${1:?log folder}
DATA=${2:?data folder}
ARCHIVE=${3:-}
RUNS=$(mktemp -d)
mkdir -p "$LOG"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

for gz in "$DATA"/MNIST/raw/*.gz; do
    [ -e "$gz" ] && gunzip -f "$gz"
done

printf 'step\trc\tseconds\n' >"$LOG/summary.tsv"
step() {  # step NAME LIMIT_SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    local t0 t1 rc
    t0=$(date +%s.%N)
    timeout --signal=TERM --kill-after=10 "$limit" "$@" >"$LOG/$name.log" 2>&1
    rc=$?
    t1=$(date +%s.%N)
    printf '%s\t%s\t%.2f\n' "$name" "$rc" "$(python3 -c "print($t1 - $t0)")" | tee -a "$LOG/summary.tsv"
    [ -n "$ARCHIVE" ] && tar -czf "$ARCHIVE" -C "$LOG" .
}

{
    date -u +%Y-%m-%dT%H:%M:%SZ
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    lscpu | grep -E 'Model name|^CPU\(s\)'
    grep -o -w -E 'avx2|avx512f|avx512_vnni|avx_vnni|amx_int8' /proc/cpuinfo | sort | uniq -c
    $PY -c 'import sys, torch, torchvision; print(sys.version.split()[0], torch.__version__, torchvision.__version__, torch.version.cuda, torch.cuda.get_device_name(0))'
} >"$LOG/machine.txt" 2>&1

# the step taken apart: ms per step and accuracy with bf16 autocast and channels-last on and off
step gpu-step 100 $PY bench/gpu_step.py --data-dir "$DATA" --json "$LOG/gpu-step.json"
# fine4, 20 epochs, the whole process incl. evaluation: target <= 15 s and >= 99.4%
step fine4-eager 150 $PY -m toolkit train recipes/fine4.toml --device cuda --data-dir "$DATA" --out "$RUNS" --json
step fine4-cudagraphs 120 $PY -m toolkit train recipes/fine4.toml --device cuda --data-dir "$DATA" --out "$RUNS" --compile reduce-overhead --json
# the GPU training path's test: fine4 2 epochs on 10,000 images, eager and CUDA graphs, >= 93%
step test-gpu-training 200 env TOOLKIT_DATA_DIR="$DATA" $PY -m pytest tests/test_train.py -k gpu_training -rs -p no:cacheprovider
# the ratio against the seeds' pipeline on the same GPU (target >= 20x)
step fine4-ratio 120 $PY bench/train_speed.py --recipe fine4 --epochs 2 --device cuda --data-dir "$DATA" --json "$LOG/fine4-ratio.json"
# FT-6 and ResNet20 on CIFAR-shaped generated files, against the same baseline
step ft6-ratio 120 $PY bench/train_speed.py --recipe ft6 --epochs 1 --generated-cifar 50000 --device cuda --json "$LOG/ft6-ratio.json"
step resnet20-ratio 120 $PY bench/train_speed.py --recipe resnet20_baseline --epochs 1 --generated-cifar 50000 --device cuda --json "$LOG/resnet20-ratio.json"
