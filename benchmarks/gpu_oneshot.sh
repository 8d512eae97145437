#!/usr/bin/env bash
# One short GPU session, everything in one output folder:
#   1. the GPU benchmark size (each method's epoch-time ratio to PGD-10, the
#      bf16 fraction of peak, the plain-loop baseline) -> OUT/benchmarks.md;
#   2. the study at full scale (PreActResNet18, all 50,000 CIFAR-10 images,
#      30 epochs, the APART protocol), PGD-10 and APART first, with the time
#      left of the total budget -> OUT/study/results.md, results.json, figures.
# It runs from a source checkout (PYTHONPATH is set to it), needs no package
# index, and leaves every partial result resumable: run it again with the same
# OUT to continue the study.
#
#   bash benchmarks/gpu_oneshot.sh DATA_DIR OUT_DIR            # on a CUDA machine
#   bash benchmarks/gpu_oneshot.sh --dry-run DATA_DIR OUT_DIR  # its logic on a CPU in under a minute
#
# DATA_DIR holds cifar-10-batches-py/. ADVTRAIN_ONESHOT_BUDGET: total seconds
# (default 480, or 50 with --dry-run).
set -euo pipefail

dry_run=0
if [ "${1:-}" = "--dry-run" ]; then
    dry_run=1
    shift
fi
if [ $# -ne 2 ]; then
    echo "usage: bash benchmarks/gpu_oneshot.sh [--dry-run] DATA_DIR OUT_DIR" >&2
    exit 2
fi
data=$(cd "$1" && pwd)
mkdir -p "$2"
out=$(cd "$2" && pwd)
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)

if [ "$dry_run" = 1 ]; then
    total=${ADVTRAIN_ONESHOT_BUDGET:-50}
    bench=(--bench-size smoke --bench-data synthetic --bench-methods apart)
    study=(--device cpu --model smallcnn --width 4 --train-examples 64 --epochs 2 --eval-examples 16
           --batch-size 32 --methods pgd,apart)
else
    total=${ADVTRAIN_ONESHOT_BUDGET:-480}
    python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: use --dry-run')"
    # a fifth of an epoch per round keeps the table within about two minutes
    bench=(--bench-size gpu --bench-data "$data" --bench-examples 10000 --bench-rounds 2
           --bench-methods fgsm,fgsm-rs,nfgsm,atta,apart,trades,fgsm-pgi,free-at)
    study=(--scale gpu --methods pgd,apart,fgsm,fgsm-rs,nfgsm,atta,pgd-at-wa,trades,fgsm-pgi)
fi

python - > "$out/environment.txt" <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
EOF
echo "== benchmark ($(cat "$out/environment.txt" | tr '\n' ' '))"
python -m pytest benchmarks/ -q -p no:cacheprovider "${bench[@]}" --bench-report "$out/benchmarks.md" \
    2>&1 | tee "$out/benchmarks.log"

# the study gets what is left, less a margin for writing its report
left=$(( total - ($(date +%s) - start) - 10 ))
if [ "$left" -le 0 ]; then
    echo "== no time left for the study (budget ${total}s)"
    exit 0
fi
echo "== study, ${left}s of the ${total}s budget left"
python -m advtrain study --data "$data" --out "$out/study" --order given --budget "${left}s" --no-progress \
    --protocol apart "${study[@]}" 2>&1 | tee "$out/study.log"
echo "== done in $(( $(date +%s) - start ))s: $out/benchmarks.md, $out/study/results.md"
