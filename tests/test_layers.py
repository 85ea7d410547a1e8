"""Tests of vgg_jax.layers: the layers written for a backend's speed compute what the
plain ones do (2x2 max-pooling against flax's reduce_window, im2col against XLA's
convolution), values and gradients, and "auto" picks im2col only where it should."""

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


@pytest.mark.parametrize("x_shape, w_shape, padding", CONVS)
def test_im2col_is_xla_convolution_values_and_gradients(x_shape, w_shape, padding):
  """To float rounding: im2col sums the window's products in another order."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
  w = jnp.asarray(rng.normal(size=w_shape), jnp.float32)
  convs = {lowering: (lambda a, b, f=layers.conv_general_dilated(lowering):
                      f(a, b, (1, 1), padding, dimension_numbers=DIMENSIONS))
           for lowering in ("xla", "im2col")}
  xla, im2col = (conv(x, w) for conv in convs.values())
  assert im2col.shape == xla.shape
  np.testing.assert_allclose(im2col, xla, rtol=1e-5, atol=1e-5)
  cotangent = jnp.asarray(rng.normal(size=xla.shape), jnp.float32)
  grads = [jax.vjp(conv, x, w)[1](cotangent) for conv in convs.values()]
  for g_xla, g_im2col in zip(*grads):
    np.testing.assert_allclose(g_im2col, g_xla, rtol=1e-5, atol=1e-4)


def primitives(fn, *args):
  return {str(e.primitive) for e in jax.make_jaxpr(fn)(*args).eqns}


@pytest.mark.parametrize("side, lowering, im2col", [
    (2, "auto", True),     # a map smaller than the 3x3 filter, on CPU
    (8, "auto", False),
    (8, "im2col", True),
    (2, "xla", False)])
def test_which_convolutions_take_im2col(side, lowering, im2col):
  assert jax.default_backend() == "cpu"
  conv = layers.conv_general_dilated(lowering)
  x, w = jnp.zeros((1, side, side, 4)), jnp.zeros((3, 3, 4, 5))
  found = primitives(lambda a, b: conv(a, b, (1, 1), "SAME",
                                       dimension_numbers=DIMENSIONS), x, w)
  assert ("conv_general_dilated" not in found) == im2col
  assert ("dot_general" in found) == im2col
  # Strided convolutions are always XLA's.
  strided = primitives(lambda a, b: conv(a, b, (2, 2), "SAME",
                                         dimension_numbers=DIMENSIONS), x, w)
  assert "conv_general_dilated" in strided


def test_a_net_computes_the_same_with_every_lowering():
  """Net A at 1/16 width on 32-pixel images: its last two convs run on 2x2 maps."""
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  outputs = []
  for lowering in layers.CONV_LOWERINGS:
    net = models.create_model("A", width=1 / 16, fc_width=32, num_classes=10,
                              conv_lowering=lowering)
    params = models.init_params(net, jax.random.key(1), (32, 32, 3))
    outputs.append(net.apply({"params": params}, images))
  for other in outputs[1:]:
    np.testing.assert_allclose(other, outputs[0], rtol=1e-4, atol=1e-5)


def test_an_unknown_lowering_is_refused():
  with pytest.raises(ValueError, match=r"conv_lowering must be one of auto, xla, "
                     r"im2col, got 'fast'"):
    models.create_model("A", conv_lowering="fast")
  config = default.get_config()
  config.conv_lowering = "fast"
  with pytest.raises(ValueError, match="conv_lowering must be one of"):
    config_checks.validate_config(config)
