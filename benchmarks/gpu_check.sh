#!/usr/bin/env bash
# GPU check for a lent GPU machine: install what it lacks, run the GPU tests, run the
# throughput benchmarks at 640x640, and write JSON rows that benchmarks/RESULTS.md is built from.
#
#   benchmarks/gpu_check.sh [--wheels DIR] [--quick]
#
# Output: $OUT (the device tool's result folder) if set, else benchmarks/results/gpu-DATE/.
#   env.txt           nvidia-smi, python/torch/CUDA versions, what was installed or missing
#   pytest.txt        the GPU tests (tests/test_throughput.py + test_dali.py + test_pad_mask.py -k gpu; tests/test_kernel.py, tests/test_losses.py)
#   model.jsonl       model stage 640: fp32 NCHW, fp32 NHWC, bf16 NCHW, bf16 NHWC (alternated, 2 rounds)
#   sweep.jsonl       model stage 640 bf16 NHWC, --sweep batch_size=8,16,32,64,128 (OOM = the limit)
#   all.jsonl         data + model + train + breakdown, --loader dali,torch,naive, 640, bf16 NHWC
#   dist.jsonl        torchrun over every GPU (nccl) with the scaling efficiency, when there are >= 2
#   trace/            a torch.profiler trace of 5 model steps (Perfetto / TensorBoard)
#
# Missing packages: installed from --wheels DIR (pip --no-index --find-links DIR) when given,
# else from the package index if the machine can reach it. GPU machines without network need
# the wheels carried along (DALI's wheel for CUDA 13 is ~400 MB: if it cannot come, the DALI
# rows and tests are skipped and env.txt says so; everything else still runs).
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS="" QUICK=0
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS="$2"; shift 2 ;;
    --quick) QUICK=1; shift ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && "$(pwd)/.venv/bin/python" -c "import torch,sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null \
  && PY="$(pwd)/.venv/bin/python"
RES=${OUT:-benchmarks/results/gpu-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$RES"
ENV="$RES/env.txt"
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu_check.sh: $PY sees no CUDA GPU; run this on a GPU machine" >&2
  exit 2
fi
{ nvidia-smi || true; "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count(), torch.cuda.get_device_name())"; } > "$ENV" 2>&1

# module:distribution pairs the package needs (setup.cfg install_requires) and the tests use.
NEEDS="segmentation_models_pytorch:segmentation-models-pytorch webdataset:webdataset tyro:tyro tomli_w:tomli-w
tifffile:tifffile imagecodecs:imagecodecs pycocotools:pycocotools albumentations:albumentations
nvidia.dali:nvidia-dali-cuda130 deepspeed:deepspeed wandb:wandb"
MISSING=""
for pair in $NEEDS; do
  mod=${pair%%:*} dist=${pair##*:}
  "$PY" -c "import $mod" 2>/dev/null && continue
  if [ -n "$WHEELS" ]; then
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" "$dist" >>"$ENV" 2>&1
  else
    "$PY" -m pip install -q "$dist" >>"$ENV" 2>&1
  fi
  "$PY" -c "import $mod" 2>/dev/null || MISSING="$MISSING $dist"
done
echo "still missing after install:${MISSING:- nothing}" | tee -a "$ENV"
HAVE_DALI=0; "$PY" -c "import nvidia.dali" 2>/dev/null && HAVE_DALI=1
HAVE_SMP=0; "$PY" -c "import segmentation_models_pytorch" 2>/dev/null && HAVE_SMP=1
if [ $HAVE_SMP = 0 ]; then
  echo "gpu_check.sh: segmentation-models-pytorch is missing and could not be installed; pass --wheels DIR" >&2
fi

# 1. GPU tests: the GPU checks of the throughput and DALI suites (fused kernel vs reference,
# bf16/channels-last model stage with MFU, DALI mixed decode, the DALI GPU pipeline against the
# CPU one, the compiled kernels with a pad mask, nccl with >= 2 GPUs), then the whole kernel and loss suites, which on a GPU also
# exercise the compiled Triton kernel. Two runs: `-k gpu` would deselect most of the second.
"$PY" -m pytest -q -p no:cacheprovider -o addopts="" tests/test_throughput.py tests/test_dali.py tests/test_pad_mask.py -k gpu \
  2>&1 | tee "$RES/pytest.txt" | tail -5
TEST_RC=${PIPESTATUS[0]}
"$PY" -m pytest -q -p no:cacheprovider -o addopts="" tests/test_kernel.py tests/test_losses.py \
  2>&1 | tee -a "$RES/pytest.txt" | tail -5
[ "${PIPESTATUS[0]}" -eq 0 ] || TEST_RC=1

# 2. Benchmarks at 640x640 (U-Net/ResNet34, 3 channels, global batch 32).
TP="$PY benchmarks/throughput.py --device cuda --size 640 --arch unet --encoder resnet34 --in-channels 3"
STEPS="--steps 50 --warmup 10"; [ $QUICK = 1 ] && STEPS="--steps 10 --warmup 3"
: > "$RES/model.jsonl"
for round in 1 2; do   # alternate the variants so clock/thermal drift hits them alike
  for v in "--amp off --no-channels-last" "--amp off --channels-last" "--amp bf16 --no-channels-last" "--amp bf16 --channels-last"; do
    $TP --stage model --batch-size 32 $STEPS $v --json "$RES/model.part.jsonl" && cat "$RES/model.part.jsonl" >> "$RES/model.jsonl"
  done
done
rm -f "$RES/model.part.jsonl"
$TP --stage model --amp bf16 --channels-last $STEPS --sweep batch_size=8,16,32,64,128 --json "$RES/sweep.jsonl"
LOADERS="dali,torch,naive"; [ $HAVE_DALI = 0 ] && LOADERS="torch,naive"
$TP --stage all --synthetic --loader $LOADERS --codec png --source-size 512 --samples 256 --batch-size 32 \
  --amp bf16 --channels-last $STEPS --workers 8 --json "$RES/all.jsonl"
$TP --stage model --amp bf16 --channels-last --batch-size 32 --steps 5 --warmup 5 --profile "$RES/trace" --json "$RES/trace.jsonl"
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -ge 2 ]; then
  "$PY" -m torch.distributed.run --nproc-per-node "$NGPU" benchmarks/throughput.py --device cuda --size 640 \
    --stage model --amp bf16 --channels-last --batch-size $((32 * NGPU)) $STEPS --json "$RES/dist.jsonl"
fi
echo "gpu_check.sh: results in $RES (tests exit status $TEST_RC)"
exit $TEST_RC
