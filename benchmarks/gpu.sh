#!/usr/bin/env bash
# One prepared GPU benchmark run (target: under 8 minutes on one H100/H200/A100):
#   1. ResNet-50 and MobileNetV2 (224 px) bfloat16 training img/s at batch 128 and 256
#      (jcv.train.step.train_step, jitted, state donated; XLA's own convolutions on GPU), plus
#      inference img/s at the larger batch; FLOPs from XLA's cost analysis and MFU.
#   2. CIFAR-10 with the airbench-style "gpu" preset of experiments/cifar10.py (10 epochs,
#      batch 1024, bfloat16): test accuracy and wall time, and the first eval reaching 94 %.
#
# Usage (from the repository root):  bash benchmarks/gpu.sh [OUT_DIR] [CIFAR_DIR]
#   OUT_DIR   where results go (default: $OUT if set, else benchmarks/results/gpu)
#   CIFAR_DIR CIFAR-10 image folder (default: shared/data/cifar10 or ../shared/data/cifar10)
# Targets from issue 7: ResNet-50 bf16 >= 3,000 img/s on one H100; MobileNetV2 >= 2.5x that.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-benchmarks/results/gpu}}"
CIFAR_DIR="${2:-}"
if [[ -z "$CIFAR_DIR" ]]; then
  for d in shared/data/cifar10 ../shared/data/cifar10; do [[ -d "$d/train" ]] && CIFAR_DIR="$d" && break; done
fi
PY="${PYTHON:-python}"
[[ -x .venv/bin/python && -z "${PYTHON:-}" ]] && PY=.venv/bin/python
mkdir -p "$OUT_DIR"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
START=$(date +%s)
{
  echo "# jcv GPU benchmark $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" -c "import jax; print('jax', jax.__version__, jax.devices())"
} | tee "$OUT_DIR/machine.txt"

echo "== 1/2 throughput (ResNet-50, MobileNetV2; bf16; train at 128 and 256) =="
timeout 300 "$PY" benchmarks/throughput.py --models resnet50:224,mobilenet_v2:224 \
  --batch-sizes 128,256 --dtypes bfloat16 --modes train,infer --rounds 5 --iters 4 --warmup 3 \
  --budget 25 --out "$OUT_DIR/throughput" || echo "throughput run failed or timed out (rc=$?)"

echo "== 2/2 CIFAR-10 time to 94% (experiments/cifar10.py --preset gpu) =="
if [[ -n "$CIFAR_DIR" ]]; then
  WORK="$OUT_DIR/cifar10_gpu"
  rm -rf "$WORK"
  T0=$(date +%s)
  timeout 240 "$PY" experiments/cifar10.py --preset gpu --data-dir "$CIFAR_DIR" --workdir "$WORK" \
    --set "evaluation.every=1 epochs" --set run.plots=false || echo "cifar10 run failed or timed out (rc=$?)"
  T1=$(date +%s)
  "$PY" - "$WORK" "$((T1 - T0))" <<'EOF' | tee "$OUT_DIR/cifar10_summary.txt"
import json, pathlib, sys
work, wall = pathlib.Path(sys.argv[1]), int(sys.argv[2])
print(f"process wall time (incl. startup, data decode, compile): {wall} s")
res = work / "results.json"
if res.exists():
  r = json.loads(res.read_text())
  ev = (r.get("final") or {}).get("eval") or {}
  print(f"final test top1 {ev.get('top1')}, training loop wall {r.get('wall_time_s'):.1f} s, "
        f"train img/s {r.get('train_img_per_s')}")
rows = []
log = work / "metrics.jsonl"
if log.exists():
  rows = [json.loads(l) for l in log.read_text().splitlines() if l.strip()]
evals = [x for x in rows if x.get("split") == "eval" and "top1" in x]
for x in evals:
  print("eval", {k: x[k] for k in x if k in ("step", "epoch", "top1", "time", "wall_time_s", "elapsed_s")})
hit = next((x for x in evals if x["top1"] >= 0.94), None)
print("first eval >= 94%:", hit if hit else "none")
EOF
else
  echo "no CIFAR-10 folder found (pass it as the 2nd argument)"
fi
echo "total $(( $(date +%s) - START )) s; results in $OUT_DIR"
