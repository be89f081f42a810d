#!/usr/bin/env bash
# The GPU checks of docs/benchmarks.md ("GPU targets"), as one script for the project's GPU
# machine: each step under its own time limit, its output and wall time logged, a summary at
# the end. Usage, from the repository root:
#
#   bench/gpu_runbook.sh LOG_DIR DATA_DIR [ARCHIVE.tar.gz]
#
# LOG_DIR gets one log per step, summary.tsv (step, exit code, wall seconds) and summary.json
# (bench/gpu_summary.py: the machine, torch, and each target's seconds and accuracy); DATA_DIR holds
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
step() {  # step NAME LIMIT_SECONDS COMMAND...  (with ONLY="name ...", only the steps named)
    local name=$1 limit=$2
    shift 2
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return 0; fi
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

# the step taken apart: ms per step, captured and not, bf16 autocast and channels-last on and off
step gpu-step 75 $PY bench/gpu_step.py --data-dir "$DATA" --json "$LOG/gpu-step.json"
# fine4, the full recipe (20 epochs), the whole process: target <= 15 s (<= 10 s of training), best >= 99.4%
step fine4 60 $PY -m toolkit train recipes/fine4.toml --device cuda --data-dir "$DATA" --out "$RUNS/fine4" --json
cp "$RUNS"/fine4/*/metrics.csv "$LOG/fine4-metrics.csv" 2>/dev/null
# three seeds together: target <= 2x one seed's time, mean final within 0.1 pp of the seed's 99.53%
step fine4-seeds 90 $PY -m toolkit train recipes/fine4.toml --seeds 1,2,3 --device cuda --data-dir "$DATA" --out "$RUNS/seeds" --json
cp "$RUNS"/seeds/fine4-seeds-*.json "$LOG/fine4-seeds.json" 2>/dev/null
# one epoch on 50,000 generated CIFAR images against the seeds' pipeline: target <= 1.5 s of training, >= 10x
step resnet20-ratio 90 $PY bench/train_speed.py --recipe resnet20_baseline --epochs 1 --generated-cifar 50000 --device cuda --json "$LOG/resnet20-ratio.json"
# later epochs, without the first one's warm-up, capture and cuDNN search: the steady cost of an epoch
step resnet20-epochs 60 $PY bench/train_speed.py --recipe resnet20_baseline --epochs 3 --generated-cifar 50000 --device cuda --toolkit-only --json "$LOG/resnet20-epochs.json"
step ft6-epochs 75 $PY bench/train_speed.py --recipe ft6 --epochs 2 --generated-cifar 50000 --device cuda --toolkit-only --json "$LOG/ft6-epochs.json"
# fine4 against the seeds' pipeline, 1 epoch each: target >= 10x
step fine4-ratio 75 $PY bench/train_speed.py --recipe fine4 --epochs 1 --device cuda --data-dir "$DATA" --json "$LOG/fine4-ratio.json"
# the GPU training test: the eager loop and the graph engine each learn, and agree within the band the test states
step test-gpu-training 140 env TOOLKIT_DATA_DIR="$DATA" $PY -m pytest tests/train/test_train.py -k gpu_training -rs -s -p no:cacheprovider
# what torch.compile inside the captured step would give (compilation is paid in the first epoch)
step gpu-step-compiled 150 $PY bench/gpu_step.py --data-dir "$DATA" --compile --json "$LOG/gpu-step-compiled.json"
$PY bench/gpu_summary.py "$LOG" >"$LOG/summary.json"
[ -n "$ARCHIVE" ] && tar -czf "$ARCHIVE" -C "$LOG" .
