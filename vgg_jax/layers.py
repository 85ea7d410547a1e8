"""The nets' layers as array functions: AlexNet's local response normalisation (net
A-LRN), 2x2 max-pooling, and the convolution the conv layers call, each written for
the speed of the backend that runs it."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array


def local_response_norm(x: Array, *, size: int = 5, alpha: float = 1e-4,
                        beta: float = 0.75, k: float = 2.0) -> Array:
  """AlexNet's LRN across channels of an NHWC tensor (its hyperparameters:
  `models.ALEXNET_LRN`)."""
  if size < 1 or size % 2 == 0:
    raise ValueError(f"LRN size must be a positive odd number of channels (AlexNet: 5), "
                     f"got {size!r}.")
  half = size // 2
  squares = jnp.square(x.astype(jnp.float32))
  window_sums = jax.lax.reduce_window(
      squares, 0.0, jax.lax.add,
      window_dimensions=(1, 1, 1, size), window_strides=(1, 1, 1, 1),
      padding=((0, 0), (0, 0), (0, 0), (half, half)))
  return (x / jnp.power(k + alpha * window_sums, beta)).astype(x.dtype)


def _pool_windows(x: Array) -> Array:
  """X's 2x2 windows as [N, H/2, 2, W/2, 2, C], a last odd row or column dropped."""
  n, h, w, c = x.shape
  return x[:, :h // 2 * 2, :w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c)


@jax.custom_vjp
def max_pool_2x2(x: Array) -> Array:
  """2x2 max-pooling, stride 2, a last odd row or column dropped (as "VALID").

  The same values and gradients as `nn.max_pool` (reduce_window), ties included: a
  window's gradient goes to its first maximum in row-major order, as in Caffe and
  PyTorch. Written as a reshape and a max with its own backward (one elementwise pass
  over the input) because XLA's CPU backend computes reduce_window's select-and-scatter,
  and the reshape form's own gradient, several times slower."""
  return _pool_windows(x).max(axis=(2, 4))


def _max_pool_forward(x: Array) -> tuple[Array, tuple[Array, Array]]:
  y = max_pool_2x2(x)
  return y, (x, y)


def _max_pool_backward(residuals: tuple[Array, Array], grad: Array) -> tuple[Array]:
  x, y = residuals
  n, h, w, c = x.shape
  is_max = _pool_windows(x) == y[:, :, None, :, None]
  # The first maximum of each window: none before it in its row, nor in the row above.
  left_is_max = jnp.concatenate([jnp.zeros_like(is_max[:, :, :, :, :1]),
                                 is_max[:, :, :, :, :1]], axis=4)
  row_has_max = is_max.any(axis=4, keepdims=True)
  upper_has_max = jnp.concatenate([jnp.zeros_like(row_has_max[:, :, :1]),
                                   row_has_max[:, :, :1]], axis=2)
  first = is_max & ~left_is_max & ~upper_has_max
  dx = jnp.where(first, grad[:, :, None, :, None], jnp.zeros((), grad.dtype))
  dx = dx.reshape(n, h // 2 * 2, w // 2 * 2, c)
  return (jnp.pad(dx, ((0, 0), (0, h % 2), (0, w % 2), (0, 0))),)


max_pool_2x2.defvjp(_max_pool_forward, _max_pool_backward)


# ------------------------------------------------------------------------- convolution

# How the conv layers are computed: XLA's convolution; im2col (each output position's
# input window copied into channels, then one matrix product); or taps (the sum over
# the filter's taps of shifted input planes, one fused pass; its gradients XLA's
# convolution's). "auto" takes the other two only on CPU, where XLA's convolution is
# slow, for the demo's batch of 128 on a 2-core Xeon:
# - taps on the image layer (1 or 3 input channels): conv1 with its ReLU and pooling,
#   forward and backward, 4.6 ms gray and 6.2 ms RGB against XLA's 6.4 and 7.5; the
#   train step (alternating runs) 2,964-3,082 -> 3,158-3,260 images/s. With 12 input
#   channels taps is the slower one (forward and weight gradient 5.5 against 3.7 ms).
# - im2col on maps smaller than the filter (the demo's 2x2 maps under 3x3 filters,
#   where XLA swaps input and filter): forward pass and input gradient 0.5-0.7 ms a
#   layer against XLA's 2.6-3.2; the train step, "auto" (im2col only) against "xla" in
#   one process, four pairs: 2,861 / 2,794, 3,303 / 2,687, 3,080 / 2,813, 2,798 / 2,736
#   images/s. On larger maps im2col's weight gradients take 1.6-2.5x XLA's.
# XLA's convolutions here are its own kernels, not YNNPACK's (`xla_flags.py`). On GPUs
# and TPUs XLA's convolution is the one to use (cuDNN, the MXU).
CONV_LOWERINGS = ("auto", "xla", "im2col", "taps")
_NHWC = jax.lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1),
                                     out_spec=(0, 3, 1, 2))
_IMAGE_CHANNELS = 3  # "auto" computes layers with at most this many input channels by taps


def check_conv_lowering(lowering: str) -> None:
  if lowering not in CONV_LOWERINGS:
    raise ValueError(f"conv_lowering must be one of {', '.join(CONV_LOWERINGS)}, got "
                     f"{lowering!r}.")


def im2col_patches(x: Array, kernel_size: tuple[int, int],
                   padding: tuple[tuple[int, int], tuple[int, int]]) -> Array:
  """[N, H', W', kh * kw * C]: at each output position of a stride-1 convolution, its
  kh x kw input window, in the order of an HWIO kernel reshaped to [kh * kw * C, O]
  (built one axis at a time: kw shifted copies along the width, then kh along the
  height)."""
  kh, kw = kernel_size
  x = jnp.pad(x, ((0, 0),) + tuple(padding) + ((0, 0),))
  out_h, out_w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  rows = jnp.concatenate([x[:, :, j:j + out_w] for j in range(kw)], axis=-1)
  return jnp.concatenate([rows[:, i:i + out_h] for i in range(kh)], axis=-1)


def _xla_conv(x: Array, kernel: Array, padding) -> Array:
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=_NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def tap_sum_conv(x: Array, kernel: Array, padding: tuple[tuple[int, int], ...]) -> Array:
  """A stride-1 NHWC convolution of X by an HWIO KERNEL written as the sum, over the
  kernel's taps (i, j, c), of X's channel c shifted by (i, j) times the tap's output
  weights: one elementwise pass, in float32. For layers with few input channels (an
  image's 1 or 3). Its gradients are XLA's convolution's (written as taps they would be
  a reduction per tap)."""
  kh, kw, in_features, out_features = kernel.shape
  x = jnp.pad(x, ((0, 0),) + tuple(padding) + ((0, 0),)).astype(jnp.float32)
  out_h, out_w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  kernel = kernel.astype(jnp.float32)
  total = jnp.zeros(x.shape[:1] + (out_h, out_w, out_features), jnp.float32)
  for i in range(kh):
    for j in range(kw):
      for c in range(in_features):
        total = total + x[:, i:i + out_h, j:j + out_w, c, None] * kernel[i, j, c]
  # XLA fuses an elementwise producer into each of its consumers (the ReLU, pooling and
  # both their backward passes), which would sum the taps once per consumer. A product
  # with the identity is never fused into them, so the sum is computed once; it is
  # exact (each output gains only zeros).
  identity = jnp.eye(out_features, dtype=jnp.float32)
  return (total.reshape(-1, out_features) @ identity).reshape(total.shape)


def _tap_sum_forward(x, kernel, padding):
  return tap_sum_conv(x, kernel, padding), (x, kernel)


def _tap_sum_backward(padding, residuals, grad):
  x, kernel = residuals
  _, vjp = jax.vjp(lambda a, b: _xla_conv(a, b, padding), x, kernel)
  return vjp(grad.astype(jnp.result_type(x, kernel)))


tap_sum_conv.defvjp(_tap_sum_forward, _tap_sum_backward)


def conv_general_dilated(lowering: str = "auto"):
  """A drop-in for `jax.lax.conv_general_dilated` (what `flax.linen.Conv` calls) that
  computes a stride-1 NHWC convolution the LOWERING way (`CONV_LOWERINGS`), and any
  other convolution with XLA's. im2col holds kh x kw copies of the layer's input (kept
  for the backward pass when training); taps unrolls kh x kw x C terms (for layers with
  few input channels)."""
  check_conv_lowering(lowering)

  def conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
           dimension_numbers=None, feature_group_count=1, precision=None,
           preferred_element_type=None):
    kwargs = dict(lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                  dimension_numbers=dimension_numbers,
                  feature_group_count=feature_group_count, precision=precision,
                  preferred_element_type=preferred_element_type)
    how = _chosen_lowering(lowering, lhs, rhs, window_strides, **kwargs)
    if how == "xla":
      return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)
    kh, kw, in_features, out_features = rhs.shape
    if isinstance(padding, str):
      padding = jax.lax.padtype_to_pads(lhs.shape[1:3], (kh, kw), (1, 1), padding)
    padding = tuple(tuple(int(p) for p in pair) for pair in padding)
    if how == "taps":
      return tap_sum_conv(lhs, rhs, padding).astype(
          preferred_element_type or jnp.result_type(lhs, rhs))
    patches = im2col_patches(lhs, (kh, kw), padding)
    return jax.lax.dot_general(
        patches, rhs.reshape(kh * kw * in_features, out_features),
        (((3,), (0,)), ((), ())), precision=precision,
        preferred_element_type=preferred_element_type)

  return conv


def _chosen_lowering(lowering, lhs, rhs, window_strides, *, lhs_dilation,
                     rhs_dilation, dimension_numbers, feature_group_count, **_) -> str:
  """How a convolution is computed under LOWERING: "xla", "im2col" or "taps"."""
  if (lhs.ndim != 4 or feature_group_count != 1 or tuple(window_strides) != (1, 1)
      or any(d != 1 for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ()))
      or jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
      != _NHWC):
    return "xla"
  if lowering != "auto":
    return lowering
  if jax.default_backend() != "cpu":
    return "xla"
  if rhs.shape[2] <= _IMAGE_CHANNELS:
    return "taps"
  if lhs.shape[1] < rhs.shape[0] or lhs.shape[2] < rhs.shape[1]:
    return "im2col"
  return "xla"
