"""Tests of vgg_jax.layers: the layers written for a backend's speed compute what the
plain ones do (2x2 max-pooling against flax's reduce_window, im2col and taps against
XLA's convolution), values and gradients, and "auto" picks each only where it should."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from vgg_jax import config_checks
from vgg_jax import layers
from vgg_jax import models

DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def flax_max_pool(x):
  return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")


@pytest.mark.parametrize("ties", [False, True])
def test_max_pool_2x2_is_flax_max_pool_values_and_gradients(ties):
  """Odd sizes included; with ties (pixels drawn from {0, 1, 2}) the gradient goes to
  each window's first maximum, as reduce_window's select-and-scatter gives it."""
  rng = np.random.default_rng(0)
  for shape in ((2, 8, 8, 3), (2, 7, 9, 4), (1, 1, 3, 2)):
    x = jnp.asarray(rng.integers(0, 3, shape) if ties else rng.normal(size=shape),
                    jnp.float32)
    np.testing.assert_array_equal(layers.max_pool_2x2(x), flax_max_pool(x))
    weights = jnp.asarray(rng.normal(size=flax_max_pool(x).shape), jnp.float32)
    np.testing.assert_array_equal(
        jax.grad(lambda v: (layers.max_pool_2x2(v) * weights).sum())(x),
        jax.grad(lambda v: (flax_max_pool(v) * weights).sum())(x))


# (input shape, kernel shape, padding): a map smaller than its filter (the demo's 2x2
# maps), ordinary SAME, 5x5 VALID, uneven explicit padding.
CONVS = [((3, 2, 2, 4), (3, 3, 4, 5), "SAME"),
         ((2, 6, 5, 3), (3, 3, 3, 4), "SAME"),
         ((2, 7, 8, 2), (5, 5, 2, 3), "VALID"),
         ((2, 5, 5, 3), (3, 3, 3, 2), ((1, 2), (0, 1)))]


@pytest.mark.parametrize("lowering", ["im2col", "taps"])
@pytest.mark.parametrize("x_shape, w_shape, padding", CONVS)
def test_the_lowerings_are_xla_convolution_values_and_gradients(x_shape, w_shape, padding,
                                                                lowering):
  """To float rounding: im2col and taps sum the window's products in another order."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
  w = jnp.asarray(rng.normal(size=w_shape), jnp.float32)
  convs = [lambda a, b, f=layers.conv_general_dilated(name):
           f(a, b, (1, 1), padding, dimension_numbers=DIMENSIONS)
           for name in ("xla", lowering)]
  xla, other = (jax.jit(conv)(x, w) for conv in convs)
  assert other.shape == xla.shape and other.dtype == xla.dtype
  np.testing.assert_allclose(other, xla, rtol=1e-5, atol=1e-5)
  cotangent = jnp.asarray(rng.normal(size=xla.shape), jnp.float32)
  grads = [jax.vjp(conv, x, w)[1](cotangent) for conv in convs]
  for g_xla, g_other in zip(*grads):
    np.testing.assert_allclose(g_other, g_xla, rtol=1e-5, atol=1e-4)


def test_taps_keep_bfloat16_and_sum_in_float32():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 6, 6, 3)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.bfloat16)
  taps = lambda a, b: layers.conv_general_dilated("taps")(
      a, b, (1, 1), "SAME", dimension_numbers=DIMENSIONS)
  y, vjp = jax.vjp(taps, x, w)
  assert y.dtype == jnp.bfloat16
  assert [g.dtype for g in vjp(jnp.ones_like(y))] == [jnp.bfloat16, jnp.bfloat16]
  in_float32 = jax.lax.conv_general_dilated(
      x.astype(jnp.float32), w.astype(jnp.float32), (1, 1), "SAME",
      dimension_numbers=DIMENSIONS)
  np.testing.assert_allclose(y.astype(jnp.float32), in_float32, rtol=1e-2, atol=1e-2)


def primitives(fn, *args):
  return {str(e.primitive) for e in jax.make_jaxpr(fn)(*args).eqns}


@pytest.mark.parametrize("side, channels, lowering, chosen", [
    (2, 4, "auto", "im2col"),   # a map smaller than the 3x3 filter, on CPU
    (8, 3, "auto", "taps"),     # an image layer: RGB
    (8, 1, "auto", "taps"),     # gray
    (8, 4, "auto", "xla"),
    (8, 4, "im2col", "im2col"),
    (8, 4, "taps", "taps"),
    (2, 4, "xla", "xla")])
def test_which_convolutions_take_which_lowering(side, channels, lowering, chosen):
  assert jax.default_backend() == "cpu"
  conv = layers.conv_general_dilated(lowering)
  x, w = jnp.zeros((1, side, side, channels)), jnp.zeros((3, 3, channels, 5))
  found = primitives(lambda a, b: conv(a, b, (1, 1), "SAME",
                                       dimension_numbers=DIMENSIONS), x, w)
  assert ("conv_general_dilated" in found) == (chosen == "xla")
  assert ("dot_general" in found) == (chosen == "im2col")
  assert any("custom_vjp" in name for name in found) == (chosen == "taps")
  # Strided convolutions are always XLA's.
  strided = primitives(lambda a, b: conv(a, b, (2, 2), "SAME",
                                         dimension_numbers=DIMENSIONS), x, w)
  assert "conv_general_dilated" in strided


def test_taps_are_summed_once_whatever_consumes_them():
  """The compiled gradient of conv1 by taps, its ReLU and pooling holds one fusion that
  sums the 27 taps (RGB input, 3x3 filter), not one per consumer."""
  conv = layers.conv_general_dilated("taps")

  def loss(x, w):
    y = conv(x, w, (1, 1), "SAME", dimension_numbers=DIMENSIONS)
    return jnp.sum(layers.max_pool_2x2(jax.nn.relu(y)) ** 2)

  x, w = jnp.ones((4, 8, 8, 3)), jnp.ones((3, 3, 3, 5))
  text = jax.jit(jax.grad(loss, 1)).lower(x, w).compile().as_text()
  computations = re.split(r"\n(?=\S)", text)
  assert sum(c.count(" multiply(") >= 27 for c in computations) == 1


def test_a_net_computes_the_same_with_every_lowering():
  """Net A at 1/16 width on 32-pixel RGB images: conv1 has 3 input channels, its last
  two convs run on 2x2 maps; the same parameters under each lowering."""
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  nets = [models.create_model("A", width=1 / 16, fc_width=32, num_classes=10,
                              conv_lowering=lowering) for lowering in layers.CONV_LOWERINGS]
  params = models.init_params(nets[0], jax.random.key(1), (32, 32, 3))
  outputs = [jax.jit(net.apply)({"params": params}, images) for net in nets]
  for other in outputs[1:]:
    np.testing.assert_allclose(other, outputs[0], rtol=1e-4, atol=1e-5)


def test_an_unknown_lowering_is_refused():
  with pytest.raises(ValueError, match=r"conv_lowering must be one of auto, xla, "
                     r"im2col, taps, got 'fast'"):
    models.create_model("A", conv_lowering="fast")
  config = default.get_config()
  config.conv_lowering = "fast"
  with pytest.raises(ValueError, match="conv_lowering must be one of"):
    config_checks.validate_config(config)
