#!/usr/bin/env bash
# The small-scale study in the README: residual routing and DAR (static, explicit, dynamic; chunk 4 and dense)
# trained on the toy shapes with one budget, one seed and one recipe, on the CPU (about 27 minutes on 2 cores),
# then the held-out velocity losses as a table and the diagnostics of residual vs DAR.
#
#     bash tools/study.sh [OUT_DIR]        (default results/study; finished runs are kept, so it can be re-run)
set -euo pipefail
OUT=${1:-results/study}
STEPS=2000
COMMON="--data=shapes --image-size=16 --model=SiT-S/4 --depth=8 --hidden-size=96 --num-heads=4
  --global-batch-size=32 --lr=3e-3 --ema-decay=0.998 --max-steps=$STEPS --log-every=500 --eval-every=500
  --eval-samples=256 --sample-every=$STEPS --sample-steps=20 --ckpt-every=$STEPS --precision=fp32 --seed=0"
RUNS="residual:residual:4 static_c4:static:4 explicit_c4:explicit:4 dynamic_c4:dynamic:4
  static_dense:static:1 explicit_dense:explicit:1 dynamic_dense:dynamic:1"
CKPT=checkpoints/$(printf %07d $STEPS).pt

for run in $RUNS; do
  IFS=: read -r name routing chunk <<< "$run"
  [ -e "$OUT/$name/$CKPT" ] || python train.py $COMMON --routing="$routing" --chunk="$chunk" --results-dir="$OUT/$name"
done

python diagnose.py --ckpt "$OUT/residual/$CKPT" --ckpt "$OUT/static_c4/$CKPT" --ckpt "$OUT/dynamic_c4/$CKPT" \
  --ckpt "$OUT/dynamic_dense/$CKPT" --num-samples=128 --probe-pairs=64 --out "$OUT/diagnose"

python - "$OUT" $RUNS <<'PY'
import json, sys
out, runs = sys.argv[1], [r.split(":")[0] for r in sys.argv[2:]]
rows = {}
for name in runs:
    with open(f"{out}/{name}/log.jsonl") as f:
        rows[name] = [r for r in map(json.loads, f) if "eval_loss" in r]
steps = [r["step"] for r in rows[runs[0]]]
print("held-out velocity loss, EMA weights (raw weights in brackets), by training step")
print("| run | " + " | ".join(str(s) for s in steps) + " |")
print("|---|" + "---|" * len(steps))
for name in runs:
    print(f"| {name} | " + " | ".join(f"{r['eval_loss_ema']:.4f} ({r['eval_loss']:.4f})" for r in rows[name]) + " |")
PY
