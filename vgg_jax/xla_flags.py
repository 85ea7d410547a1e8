"""The XLA flags this package runs with, added to XLA_FLAGS when it is imported
(`vgg_jax/__init__.py`), before JAX starts its backends: on the CPU, XLA's own
convolution kernels, and one device per core. A flag the user's XLA_FLAGS already
names is left as the user set it.

XLA reads XLA_FLAGS once, when the first computation starts its backend. The kernel
choice has no other switch that also covers `jax.pmap`; the device count has JAX's
`jax_num_cpu_devices` (JAX_NUM_CPU_DEVICES), which wins over the flag.
"""

from __future__ import annotations

import os

# XLA:CPU hands both its dots and its convolutions to YNNPACK by default (jaxlib 0.10).
# Its convolutions, the weight gradients above all, are slower there than XLA's own
# (Eigen) convolution kernels: on a 2-core Intel Xeon with AVX-512, the train step of
# the demo's net went from 0.57-0.60x to 0.74-0.77x the PyTorch peer's speed (three
# alternating runs of each), conv1's weight gradient from 5.6 to 1.7 ms and conv2's
# from 8.3 to 2.1. On a 2-core AMD EPYC with AVX2, YNNPACK turned off for dots too
# changed nothing beyond noise. Dots stay with YNNPACK, XLA's default for them. The flag
# touches only the CPU backend; GPUs and TPUs ignore it.
YNN_FUSION_TYPE = "xla_cpu_experimental_ynn_fusion_type"
CPU_DEVICE_COUNT = "xla_force_host_platform_device_count"
# On the CPU the step is mapped over one device per core, data parallelism as over
# GPUs, instead of one device whose ops XLA:CPU splits across the cores: many of a
# small net's ops split badly or not at all (tree reductions, layout transposes, small
# convolutions), so the demo's step scaled 1.63x from one core to two where PyTorch's
# scales 1.98x. The step of the demo's net on the 2-core Xeon, same run as the peer:
# 0.77-0.81x with one device, 1.00-1.05x with two (on a 2-core AMD EPYC, 0.79-0.85x
# and 0.89-1.41x; the demo's first epoch 73-75 s and 58-66 s). More devices than cores
# is slower (four on two cores: 0.76x). A power of two, so that the usual batch sizes
# divide; at most 8, which bounds the copies of the parameters and optimiser state (one
# per device) that a big net keeps in host memory. As with another number of GPUs, another
# device count changes a run's dropout masks (each device draws its own) and the order
# of its float sums, not what it computes (tests/test_train_step.py). GPUs and TPUs do
# not use these devices.
MAX_CPU_DEVICES = 8
# XLA's own value of the kernel flag (jaxlib 0.10), to compare against: pass it as
# `jax.jit(..., compiler_options=XLA_DEFAULTS)`, or set them in XLA_FLAGS.
XLA_DEFAULTS = {
    YNN_FUSION_TYPE:
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION",
}


def usable_cores() -> int:
  """The cores this process may run on (fewer than the machine's when pinned). Here, in
  the module that must import nothing heavy, so that every module can use it."""
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def cpu_device_count(cores: int) -> int:
  """One CPU device per core, rounded down to a power of two, at most MAX_CPU_DEVICES."""
  return min(MAX_CPU_DEVICES, 1 << (max(cores, 1).bit_length() - 1))


def package_flags(cores: int) -> dict[str, str]:
  """The flags this package adds, on a machine of CORES usable cores."""
  return {YNN_FUSION_TYPE: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
          CPU_DEVICE_COUNT: str(cpu_device_count(cores))}


def with_package_flags(xla_flags: str, cores: int | None = None) -> str:
  """XLA_FLAGS (a string of --name=value) with `package_flags` appended, but for those
  it already names."""
  named = {flag.lstrip("-").split("=", 1)[0] for flag in xla_flags.split()}
  flags = package_flags(usable_cores() if cores is None else cores)
  added = [f"--{name}={value}" for name, value in flags.items() if name not in named]
  return " ".join([xla_flags.strip()] + added).strip()
