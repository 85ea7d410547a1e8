"""The XLA flags this package runs with, added to XLA_FLAGS when it is imported
(`vgg_jax/__init__.py`), before JAX starts its backends. A flag the user's XLA_FLAGS
already names is left as the user set it.

XLA reads XLA_FLAGS once, when the first computation starts its backend; JAX has no
other switch for these options that also covers `jax.pmap`, hence the environment.
"""

from __future__ import annotations

# XLA:CPU hands both its dots and its convolutions to YNNPACK by default (jaxlib 0.10).
# Its convolutions, the weight gradients above all, are slower there than XLA's own
# (Eigen) convolution kernels: on a 2-core Intel Xeon with AVX-512, the train step of
# the demo's net went from 0.57-0.60x to 0.74-0.77x the PyTorch peer's speed (three
# alternating runs of each), conv1's weight gradient from 5.6 to 1.7 ms and conv2's
# from 8.3 to 2.1. On a 2-core AMD EPYC with AVX2, YNNPACK turned off for dots too
# changed nothing beyond noise. Dots stay with YNNPACK, XLA's default for them. The flag
# touches only the CPU backend; GPUs and TPUs ignore it.
FLAGS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
}
# XLA's own values of the same flags (jaxlib 0.10), to compare against: pass them as
# `jax.jit(..., compiler_options=XLA_DEFAULTS)`, or set them in XLA_FLAGS.
XLA_DEFAULTS = {
    "xla_cpu_experimental_ynn_fusion_type":
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION",
}


def with_package_flags(xla_flags: str) -> str:
  """XLA_FLAGS (a string of --name=value) with `FLAGS` appended, but for those it
  already names."""
  named = {flag.lstrip("-").split("=", 1)[0] for flag in xla_flags.split()}
  added = [f"--{name}={value}" for name, value in FLAGS.items() if name not in named]
  return " ".join([xla_flags.strip()] + added).strip()
