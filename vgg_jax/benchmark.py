"""Times the train step: `python -m vgg_jax.benchmark --model=D --batch_size=256
--dtype=bfloat16`.

The step is the real one from `train.py`, mapped over all local devices, fed the same
device-resident synthetic batch every step (uint8 crops finished on the device, as the
input pipeline ships them; the host side is not measured), and timed after
warm-up. Printed: images per second, step time, and model-FLOP utilisation, counting
6 x multiply-adds per image (forward 2 FLOPs per MAC, backward twice the forward) from
`summary.count_macs`, against a peak given with --peak_tflops or known for the device.
On CPU, run it small: `--model=A --width=0.125 --image_size=64 --batch_size=16`.

On CPU, with torch installed and float32, the same net, batch and optimiser step are
also timed in PyTorch eager (what a user would otherwise run; `torch_benchmark`) in the
same process, and the ratio printed: run it for the demo's net with
`--model=A --width=0.1875 --fc_width=256 --image_size=32 --batch_size=128
--dtype=float32 --num_classes=10 --steps=40`.
"""

import os
import time
from typing import Sequence

from absl import flags
import jax
import numpy as np

from configs import default
from vgg_jax import cli
from vgg_jax import config_checks
from vgg_jax import models
from vgg_jax import parallel
from vgg_jax import summary
from vgg_jax import train
from vgg_jax import transforms
from vgg_jax import xla_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "D", "Table 1 name or alias.")
flags.DEFINE_integer("batch_size", 256, "Global batch size over all local devices.")
flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "Compute dtype.")
flags.DEFINE_float("width", 1.0, "Width multiplier.")
flags.DEFINE_integer("fc_width", 4096, "fc6/fc7 width.")
flags.DEFINE_integer("image_size", 224, "Training crop size.")
flags.DEFINE_integer("num_classes", 1000, "Classes.")
flags.DEFINE_integer("steps", 20, "Timed steps.")
flags.DEFINE_integer("warmup", 3, "Untimed steps (compilation, allocation).")
flags.DEFINE_enum("mapping", "pmap", list(parallel.MAPPINGS), "Device mapping.")
flags.DEFINE_bool("compare_torch", True, "On CPU at float32, also time the same step in "
                  "PyTorch eager when torch is installed, and print the ratio.")
flags.DEFINE_float("peak_tflops", None, "Peak TFLOP/s of one device at --dtype; "
                   "default: known value for the device kind, if any.")

# Dense peak TFLOP/s per device from vendors' data sheets (float32 on GPUs: TF32 tensor
# cores, which XLA uses for float32 matmuls and convolutions by default).
PEAK_TFLOPS = {
    "H200": {"bfloat16": 989.0, "float32": 494.0},
    "H100": {"bfloat16": 989.0, "float32": 494.0},
    "A100": {"bfloat16": 312.0, "float32": 156.0},
    "V100": {"bfloat16": 125.0, "float32": 15.7},
    "TPU v5p": {"bfloat16": 459.0},
    "TPU v5 lite": {"bfloat16": 197.0},
    "TPU v4": {"bfloat16": 275.0},
}


def known_peak(device_kind: str, dtype: str) -> float | None:
  for name, peaks in PEAK_TFLOPS.items():
    if name.lower() in device_kind.lower():
      return peaks.get(dtype)
  return None


def benchmark(*, model, batch_size, dtype, width=1.0, fc_width=4096, image_size=224,
              num_classes=1000, steps=20, warmup=3, mapping="pmap") -> dict:
  """Returns step time (s), images/s and achieved TFLOP/s of the mapped train step."""
  config = default.get_config()
  config.update(dict(model=model, batch_size=batch_size, dtype=dtype, width=width,
                     fc_width=fc_width, crop_size=image_size, mapping=mapping,
                     num_classes=num_classes, train_scale_min=max(256, image_size),
                     train_scale_max=max(256, image_size),
                     eval_scale=max(256, image_size)))
  config_checks.validate_config(config)
  devices = parallel.DeviceMapping(mapping)
  n = devices.local_device_count
  net = models.from_config(config)
  state = devices.replicate(train.create_train_state(jax.random.key(0), config, net))
  rng = np.random.default_rng(0)
  per_device = (n, batch_size // n)
  # As the input pipeline ships them: uint8 crops and a colour shift per image, made
  # model input inside the step.
  batch = devices.shard(dict(
      image=rng.integers(0, 256, per_device + (image_size, image_size, 3), np.uint8),
      color_shift=rng.normal(size=per_device + (3,)).astype(np.float32),
      label=rng.integers(0, num_classes, size=per_device).astype(np.int32)))
  dropout_rng = devices.replicate(jax.random.key_data(jax.random.key(1)))
  lr = devices.replicate(np.float32(config.learning_rate))
  step, _ = train.map_steps(devices, net, mean=transforms.IMAGENET_MEAN_RGB)
  block_each_step = jax.default_backend() == "cpu"  # see train.py
  for _ in range(warmup):
    state, metrics = step(state, batch, dropout_rng, lr)
    jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, batch, dropout_rng, lr)
    if block_each_step:
      jax.block_until_ready(metrics)
  jax.block_until_ready(state.params)
  step_time = (time.perf_counter() - start) / steps
  macs = summary.count_macs(model, image_size=image_size, num_classes=num_classes,
                            width=width, fc_width=fc_width)
  tflops = 6 * macs * batch_size / step_time / 1e12
  return dict(step_time=step_time, images_per_second=batch_size / step_time,
              tflops=tflops, tflops_per_device=tflops / n, devices=n,
              macs_per_image=macs)


def torch_benchmark(*, model, batch_size, width=1.0, fc_width=4096, image_size=224,
                    num_classes=1000, steps=20, warmup=3) -> dict | None:
  """Step time, images/s and parameter count of the same train step in PyTorch eager on
  the CPU, with as many threads as this process may use (as XLA): the same layers
  (`models.layer_specs`), batch, softmax loss, and the default config's dropout and
  momentum SGD with weight decay, on a synthetic batch. None when torch is not
  installed (it is an optional dependency, hence the import here)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  recipe = default.get_config()
  torch.set_num_threads(xla_flags.usable_cores())
  torch.manual_seed(0)
  trunk, channels = [], 3
  for spec in models.layer_specs(model, width=width):
    if isinstance(spec, models.ConvSpec):
      trunk += [torch.nn.Conv2d(channels, spec.features, spec.filter_size,
                                padding=spec.filter_size // 2), torch.nn.ReLU()]
      channels = spec.features
    elif isinstance(spec, models.LRNSpec):  # torch divides alpha by the size
      lrn = models.ALEXNET_LRN
      trunk.append(torch.nn.LocalResponseNorm(lrn["size"], lrn["alpha"] * lrn["size"],
                                              lrn["beta"], lrn["k"]))
    else:
      trunk.append(torch.nn.MaxPool2d(2))
  side = image_size // 2 ** models.NUM_POOLS
  net = torch.nn.Sequential(
      *trunk, torch.nn.Flatten(),
      torch.nn.Linear(channels * side * side, fc_width), torch.nn.ReLU(),
      torch.nn.Dropout(recipe.dropout_rate),
      torch.nn.Linear(fc_width, fc_width), torch.nn.ReLU(),
      torch.nn.Dropout(recipe.dropout_rate),
      torch.nn.Linear(fc_width, num_classes))
  optimizer = torch.optim.SGD(net.parameters(), lr=recipe.learning_rate,
                              momentum=recipe.momentum, weight_decay=recipe.weight_decay)
  images = torch.randn(batch_size, 3, image_size, image_size)
  labels = torch.randint(0, num_classes, (batch_size,))

  def step():
    loss = torch.nn.functional.cross_entropy(net(images), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()

  for _ in range(warmup):
    step()
  start = time.perf_counter()
  for _ in range(steps):
    step()
  step_time = (time.perf_counter() - start) / steps
  return dict(step_time=step_time, images_per_second=batch_size / step_time,
              threads=torch.get_num_threads(), version=torch.__version__,
              num_params=sum(p.numel() for p in net.parameters()))


def main(argv: Sequence[str]) -> None:
  del argv
  result = benchmark(model=FLAGS.model, batch_size=FLAGS.batch_size, dtype=FLAGS.dtype,
                     width=FLAGS.width, fc_width=FLAGS.fc_width,
                     image_size=FLAGS.image_size, num_classes=FLAGS.num_classes,
                     steps=FLAGS.steps, warmup=FLAGS.warmup, mapping=FLAGS.mapping)
  kind = jax.local_devices()[0].device_kind
  peak = FLAGS.peak_tflops or known_peak(kind, FLAGS.dtype)
  print(f"device: {result['devices']} x {kind} ({jax.default_backend()})")
  print(f"XLA_FLAGS: {os.environ.get('XLA_FLAGS', '')}")  # with the package's own, xla_flags.py
  print(f"model: {FLAGS.model} width={FLAGS.width} image={FLAGS.image_size} "
        f"dtype={FLAGS.dtype} global batch={FLAGS.batch_size} mapping={FLAGS.mapping}")
  print(f"multiply-adds per image: {result['macs_per_image']:,}")
  print(f"step time: {result['step_time'] * 1e3:.1f} ms")
  print(f"images/s: {result['images_per_second']:.1f}")
  print(f"achieved: {result['tflops_per_device']:.3f} TFLOP/s per device")
  if peak:
    print(f"MFU: {100 * result['tflops_per_device'] / peak:.1f}% of {peak} TFLOP/s")
  else:
    print("MFU: unknown peak for this device; pass --peak_tflops")
  if (FLAGS.compare_torch and jax.default_backend() == "cpu"
      and FLAGS.dtype == "float32"):
    peer = torch_benchmark(model=FLAGS.model, batch_size=FLAGS.batch_size,
                           width=FLAGS.width, fc_width=FLAGS.fc_width,
                           image_size=FLAGS.image_size, num_classes=FLAGS.num_classes,
                           steps=FLAGS.steps, warmup=FLAGS.warmup)
    if peer is None:
      print("PyTorch: not installed (pip install -e '.[torch]' to compare)")
    else:
      print(f"PyTorch {peer['version']} eager, {peer['threads']} threads, same step: "
            f"{peer['step_time'] * 1e3:.1f} ms, {peer['images_per_second']:.1f} images/s")
      print(f"vgg_jax / PyTorch: "
            f"{result['images_per_second'] / peer['images_per_second']:.2f}x")


if __name__ == "__main__":
  cli.run(main)
