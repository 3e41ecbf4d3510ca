#!/usr/bin/env bash
# Training geometry on real data (issue 15): for each shared subset (BUSI ultrasound, the brain
# MRI folders, COCO brain tumour), pack it once, train its recipe scaled down with each
# --geometry (same seed, epochs and steps within a subset),
# and evaluate the test split at each image's ORIGINAL size with `--inference whole` (the
# predictor maps its geometry back; crop models are letterboxed) and, for crop, also `sliding`.
# Prints a Markdown table (docs/recipes.md records one).
#
#   scripts/geometry_check.sh              # the three subsets (~40 min on 2 busy CPU cores)
#   scripts/geometry_check.sh busi         # only the named subset(s)
#
# Environment: PY (default .venv/bin/python), DATA (default ../shared/data), WORK (default a
# new /tmp/geometry_check.XXXX), EPOCHS (overrides every subset's epochs), GEOMETRIES (overrides
# every subset's list, e.g. "crop"), SIZE (default 128),
# SEED (default 0).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$REPO/.venv/bin/python}
DATA=${DATA:-$(cd "$REPO/../shared/data" && pwd)}
WORK=${WORK:-$(mktemp -d /tmp/geometry_check.XXXX)}
SIZE=${SIZE:-128}
SEED=${SEED:-0}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
mkdir -p "$WORK"

# subset | recipe | pack options | epochs | geometries. The brain MRI (512x512) and COCO
# (640x640) images are square: letterbox places them exactly as squash does (no padding), so
# only BUSI (62 sizes, 273-841 x 367-696 px) runs all three. Epochs: what 2 CPU cores allow.
SUBSETS=(
  "busi|unetplusplus-r34-512|--split 0.7,0.2,0.1|6|squash letterbox crop"
  "images_masks_folders|pet-unet-r34-640||3|squash crop"
  "brain_tumor_coco|coco-unet-r34||2|squash crop"
)
ONLY=("$@")
results="$WORK/results.md"
echo "| subset (train/val/test) | recipe | epochs | geometry | inference | test Dice | test IoU | mean image Dice |" > "$results"
echo "| --- | --- | --- | --- | --- | --- | --- | --- |" >> "$results"

for row in "${SUBSETS[@]}"; do
  IFS='|' read -r src recipe packopts epochs geometries <<< "$row"
  epochs=${EPOCHS:-$epochs}
  geometries=${GEOMETRIES:-$geometries}
  if [ ${#ONLY[@]} -gt 0 ] && [[ ! " ${ONLY[*]} " == *" $src "* ]]; then continue; fi
  shards="$WORK/shards/$src"
  # shellcheck disable=SC2086  # packopts is a list of words
  "$PY" -m tumorseg_dist.pack "$DATA/$src" --out "$shards" --format auto --no-progress $packopts
  for geometry in $geometries; do
    echo "=== $src $geometry"
    run="$WORK/runs/$src-$geometry"
    "$PY" -m tumorseg_dist.train --config "$REPO/recipes/$recipe.toml" --data "$shards" --out "$run" \
        --geometry "$geometry" --epochs "$epochs" --size "$SIZE" --seed "$SEED" --encoder resnet18 \
        --encoder-weights none --batch-size 8 --num-workers 1 --device cpu --amp off \
        --no-channels-last --resume never --log-every 50
    # A crop model is scored both ways: whole (letterboxed) and sliding at the original size.
    inferences=whole
    [ "$geometry" = crop ] && inferences="whole sliding"
    for inference in $inferences; do
      "$PY" -m tumorseg_dist.evaluate --checkpoint "$run/checkpoints/best.pt" --out "$run/eval-$inference" \
          --inference "$inference" --workers 1
      "$PY" - "$run/eval-$inference" "$src" "$recipe" "$epochs" "$geometry" "$inference" >> "$results" <<'PYEOF'
import json, math, sys
from pathlib import Path
out, src, recipe, epochs, geometry, inference = Path(sys.argv[1]), *sys.argv[2:]
m = json.loads((out / "metrics.json").read_text())
for k in ("dice", "iou", "mean_image_dice"):
    assert m[k] is not None and math.isfinite(m[k]), f"{out}: {k} = {m[k]}"
man = json.loads((Path(m["data"]) / "manifest.json").read_text())
counts = "/".join(str(man["splits"].get(s, {}).get("samples", 0)) for s in ("train", "val", "test"))
print(f"| {src} ({counts}) | {recipe} | {epochs} | {geometry} | {inference} | {m['dice']:.3f} | {m['iou']:.3f} "
      f"| {m['mean_image_dice']:.3f} |")
PYEOF
    done
  done
done
echo
cat "$results"
echo "outputs in $WORK"
