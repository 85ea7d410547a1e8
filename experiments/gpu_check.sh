#!/usr/bin/env bash
# One GPU, a few minutes: is the chip fed? Prints
#   1. the bare VGG16 train step in bf16 (synthetic uint8 batches already on the device);
#   2. a short end-to-end run of configs/vgg16.py in bf16 on ImageNet-size JPEGs (an image
#      folder of foolbox's real ImageNet photos, re-encoded at 500x375 etc.): its logged
#      train_images_per_second and train_data_wait_fraction (near 0: the GPU is the
#      limit; near 1: the host's input pipeline is);
#   3. the PyTorch peer (torchvision VGG16, channels_last, bf16 autocast), when torch is
#      installed.
# Run from the repository root in an environment with jax[cuda] and `pip install -e
# ".[test]"`:  bash experiments/gpu_check.sh
set -euo pipefail
python=${PYTHON:-python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "== 1. train step, VGG16, bf16, batch 128"
$python -m vgg_jax.benchmark --model=D --batch_size=128 --dtype=bfloat16 --steps=30

echo "== 2. end to end: configs/vgg16.py, bf16, an image folder of 5,120 JPEGs"
$python -m vgg_jax.input_pipeline_benchmark --num_images=5120 --write_folder="$work/images"
$python -m vgg_jax.main --config=configs/vgg16.py --workdir="$work/run" \
    --config.dataset="folder:$work/images" --config.eval_split=val \
    --config.dtype=bfloat16 --config.batch_size=128 --config.num_epochs=3 \
    --config.log_every_steps=10 --config.checkpoint_every_steps=0 --config.init=glorot \
    2>&1 | grep -E "train_images_per_second|train_data_wait_fraction" || true
$python - "$work/run/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if "train_data_wait_fraction" in l][1:]
print(f"steady state (after the first interval), {len(rows)} intervals: "
      f"{sum(r['train_images_per_second'] for r in rows) / len(rows):.0f} images/s, "
      f"data wait {sum(r['train_data_wait_fraction'] for r in rows) / len(rows):.3f}")
PY

echo "== 3. PyTorch peer"
peer=../shared/peers/torch_train_bench.py
if $python -c "import torch, torchvision" 2>/dev/null && [ -f "$peer" ]; then
  $python "$peer" --batch 128
else
  echo "torch/torchvision or $peer missing: skipped"
fi
