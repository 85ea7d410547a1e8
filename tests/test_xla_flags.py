"""Tests of vgg_jax.xla_flags: the package's XLA flags reach XLA (convolutions leave
YNNPACK on the CPU, dots stay) and a user's own setting wins. That they change speed
only is tested in test_train.py (the same parameters after a short run)."""

import os
import re

import jax
import jax.numpy as jnp

from vgg_jax import xla_flags


def test_the_flags_are_added_once_and_a_users_own_setting_wins():
  name = "xla_cpu_experimental_ynn_fusion_type"
  ours = f"--{name}={xla_flags.FLAGS[name]}"
  assert xla_flags.with_package_flags("") == ours
  assert (xla_flags.with_package_flags(" --xla_force_host_platform_device_count=8 ")
          == f"--xla_force_host_platform_device_count=8 {ours}")
  assert xla_flags.with_package_flags(ours) == ours
  assert xla_flags.with_package_flags(f"--{name}=") == f"--{name}="
  assert ours in os.environ["XLA_FLAGS"].split()  # importing vgg_jax added it


def ynnpack_ops(compiled_text: str) -> list[str]:
  """The ops ('convolution', 'dot') that a compiled module runs as YNNPACK fusions."""
  computations = {m.group(1): m.group(2) for m in re.finditer(
      r"^(%\S+) \(.*?\{\n(.*?)^\}", compiled_text, re.M | re.S)}
  ops = []
  for called in re.findall(r"calls=(%[\w.\-]+).*__ynn_fusion", compiled_text):
    ops += re.findall(r"\b(convolution|dot)\(", computations[called])
  return ops


def test_convolutions_leave_ynnpack_and_dots_stay():
  """The flag reaches XLA: a conv layer and a dense layer, forward and backward, compiled
  in this process (whose XLA_FLAGS the package set) run no convolution in YNNPACK; with
  XLA's default (given as compiler options) they do."""
  x, kernel = jnp.ones((16, 4, 4, 32)), jnp.ones((3, 3, 32, 32))
  weights = jnp.ones((4 * 4 * 32, 64))

  def loss(kernel, weights):
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.sum(jax.nn.relu(y).reshape(16, -1) @ weights)

  grads = jax.grad(loss, (0, 1))
  ours = ynnpack_ops(jax.jit(grads).lower(kernel, weights).compile().as_text())
  default = ynnpack_ops(jax.jit(grads, compiler_options=xla_flags.XLA_DEFAULTS)
                        .lower(kernel, weights).compile().as_text())
  assert "dot" in ours and "convolution" not in ours
  assert "convolution" in default and "dot" in default
