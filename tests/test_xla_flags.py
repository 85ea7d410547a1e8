"""Tests of vgg_jax.xla_flags: the package's XLA flags reach XLA (convolutions leave
YNNPACK on the CPU, dots stay), the CPU device count follows the cores, and a user's
own setting wins. That they change speed only is tested elsewhere: the kernels in
test_train.py, the device count in test_train_step.py (eight devices train as one)."""

import os
import re

import jax
import jax.numpy as jnp

from vgg_jax import xla_flags


def test_the_flags_are_added_once_and_a_users_own_setting_wins():
  ours = ("--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT "
          "--xla_force_host_platform_device_count=2")
  assert xla_flags.with_package_flags("", cores=2) == ours
  assert xla_flags.with_package_flags(ours, cores=2) == ours
  assert xla_flags.with_package_flags(ours, cores=8) == ours
  assert (xla_flags.with_package_flags(" --xla_force_host_platform_device_count=1 ", cores=4)
          == "--xla_force_host_platform_device_count=1 "
             "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT")
  name = "xla_cpu_experimental_ynn_fusion_type"
  assert xla_flags.with_package_flags(f"--{name}=", cores=1) == (
      f"--{name}= --xla_force_host_platform_device_count=1")
  # Importing vgg_jax added them; conftest's 8 devices came first and won.
  assert ours.split()[0] in os.environ["XLA_FLAGS"].split()
  assert jax.local_device_count() == 8


def test_one_cpu_device_per_core_a_power_of_two_at_most_eight():
  assert [xla_flags.cpu_device_count(cores) for cores in (0, 1, 2, 3, 4, 6, 8, 12, 64)] == [
      1, 1, 2, 2, 4, 4, 8, 8, 8]
  assert xla_flags.usable_cores() >= 1


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
