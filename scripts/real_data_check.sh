#!/usr/bin/env bash
# Real-data check (issue 9): for every recipe, pack the matching subset of ../shared/data, train
# the recipe scaled down (128 px, a few epochs, resnet18, no pretrained weights, CPU), evaluate the
# test split, predict the raw image folder, and check: every command succeeds, every predicted
# mask has its image's original size and name, the metrics are finite. Prints a Markdown table
# of the Dice each run reached (docs/recipes.md records one).
#
#   scripts/real_data_check.sh                 # all six recipes (~15-40 min on 2 CPU cores, with load)
#   scripts/real_data_check.sh tif-unet-128    # only the named recipe(s)
#
# Environment: PY (python, default .venv/bin/python), DATA (default ../shared/data),
# WORK (default a new /tmp/real_data_check.XXXX), EPOCHS (default 2),
# CLASSIC_MAX_STEPS (default 6: the 31M-parameter classic U-Net is slow on CPU).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$REPO/.venv/bin/python}
DATA=${DATA:-$(cd "$REPO/../shared/data" && pwd)}
WORK=${WORK:-$(mktemp -d /tmp/real_data_check.XXXX)}
EPOCHS=${EPOCHS:-2}
CLASSIC_MAX_STEPS=${CLASSIC_MAX_STEPS:-6}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
mkdir -p "$WORK"
cd "$WORK"   # the built-in synthetic set is packed under ./shards

# recipe | shared-data folder ("-" = built-in) | pack options | folder of raw images to predict
RECIPES=(
  "unetplusplus-r34-512|busi|--split 0.7,0.2,0.1|busi/dataset"
  "tif-unet-128|lgg_kaggle_3m|--split 0.34,0.33,0.33|lgg_kaggle_3m/kaggle_3m/TCGA_CS_4941_19960909"
  "coco-unet-r34|brain_tumor_coco||brain_tumor_coco/archive/test"
  "pet-unet-r34-640|images_masks_folders||images_masks_folders/data/temp"
  "lung-unet-256|lung_nodule_ct_slices|--split 0.6,0.2,0.2|lung_nodule_ct_slices/LIDC-IDRI-slices/LIDC-IDRI-0001/nodule-0/images"
  "synthetic-quickstart|-||-"
)
ONLY=("$@")

results="$WORK/results.md"
echo "| recipe | data (train/val/test) | epochs run | test Dice | test IoU | mean image Dice | minutes |" > "$results"
echo "| --- | --- | --- | --- | --- | --- | --- |" >> "$results"

for row in "${RECIPES[@]}"; do
  IFS='|' read -r name src packopts predict_dir <<< "$row"
  if [ ${#ONLY[@]} -gt 0 ] && [[ ! " ${ONLY[*]} " == *" $name "* ]]; then continue; fi
  echo "=== $name"
  start=$(date +%s)
  run="$WORK/runs/$name"
  train_args=(--config "$REPO/recipes/$name.toml" --out "$run" --epochs "$EPOCHS" --size 128
              --encoder resnet18 --encoder-weights none --batch-size 8 --num-workers 1
              --device cpu --amp off --no-channels-last --resume never --log-every 20)
  if grep -q 'unet-classic' "$REPO/recipes/$name.toml"; then
    train_args+=(--max-steps "$CLASSIC_MAX_STEPS")
  fi
  if [ "$src" = "-" ]; then
    train_args+=(--synthetic-samples 120)   # the built-in set, scaled down too
  else
    shards="$WORK/shards/$name"
    # shellcheck disable=SC2086  # packopts is a list of words
    "$PY" -m tumorseg_dist.pack "$DATA/$src" --out "$shards" --format auto --no-progress $packopts
    train_args+=(--data "$shards")
  fi
  "$PY" -m tumorseg_dist.train "${train_args[@]}"
  ckpt="$run/checkpoints/best.pt"
  "$PY" -m tumorseg_dist.evaluate --checkpoint "$ckpt" --out "$run/eval" --workers 1
  if [ "$predict_dir" = "-" ]; then
    inputs=("$(sed -n 's/^path = "\(.*\)"/\1/p' "$run/config.toml" | head -1)")
    inputs=("$WORK/${inputs[0]#"$WORK/"}")
  else
    inputs=("$DATA/$predict_dir")
  fi
  "$PY" -m tumorseg_dist.predict --checkpoint "$ckpt" "${inputs[@]}" --out "$run/predict" \
      --overlay --tta --workers 1
  minutes=$(( ($(date +%s) - start + 30) / 60 ))
  "$PY" - "$run" "$name" "$minutes" "${inputs[0]}" >> "$results" <<'EOF'
import csv, json, math, re, sys
from pathlib import Path
from PIL import Image
run, name, minutes, inp = Path(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4])
m = json.loads((run / "eval" / "metrics.json").read_text())
for k in ("dice", "iou", "precision", "recall", "accuracy", "mean_image_dice", "mean_image_iou"):
    assert m[k] is not None and math.isfinite(m[k]), f"{name}: {k} = {m[k]}"
rows = list(csv.DictReader(open(run / "predict" / "areas.csv")))
assert rows, f"{name}: predict wrote nothing"
if (inp / "manifest.json").is_file():   # shard input: sizes from each sample's json
    for r in rows:
        assert Image.open(run / "predict" / r["mask"]).size == (int(r["width"]), int(r["height"]))
else:                                   # a raw folder: every image has its mask, same size and name
    images = sorted(p for p in inp.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".tif", ".tiff"}
                    and not re.search(r"_mask(_\d+)?$", p.stem))
    assert len(rows) == len(images), f"{name}: {len(rows)} masks for {len(images)} images"
    for img in images:
        mask = run / "predict" / "masks" / img.relative_to(inp).with_suffix(".png")
        assert mask.is_file(), f"{name}: no mask {mask} for {img}"
        assert Image.open(mask).size == Image.open(img).size, f"{name}: {mask} is not {img}'s size"
man = json.loads((Path(m["data"]) / "manifest.json").read_text())
counts = "/".join(str(man["splits"].get(s, {}).get("samples", 0)) for s in ("train", "val", "test"))
epochs = len((run / "metrics.jsonl").read_text().splitlines())
print(f"| {name} | {Path(m['data']).name} ({counts}) | {epochs} | {m['dice']:.3f} | {m['iou']:.3f} "
      f"| {m['mean_image_dice']:.3f} | {minutes} |")
print(f"{name}: OK ({len(rows)} masks at original size and name; test Dice {m['dice']:.3f})", file=sys.stderr)
EOF
done
echo
cat "$results"
echo "all checks passed; outputs in $WORK"
