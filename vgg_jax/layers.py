"""The nets' layers as array functions: AlexNet's local response normalisation (net
A-LRN), 2x2 max-pooling, and the convolution the conv layers call, each written for
the speed of the backend that runs it."""

from __future__ import annotations

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

# How the conv layers are computed: XLA's convolution, or im2col (each output position's
# input window copied into channels, then one matrix product). "auto" takes im2col only
# where XLA's CPU convolution is slow: on maps smaller than the filter (the demo's 2x2
# maps under 3x3 filters, where XLA swaps input and filter), its forward pass and input
# gradient take 2.6-3.2 ms a layer for the demo's batch against im2col's 0.5-0.7. The
# demo's train step on a 2-core Xeon, "auto" against "xla" in one process, four pairs:
# 2,861 / 2,794, 3,303 / 2,687, 3,080 / 2,813, 2,798 / 2,736 images/s. On larger maps
# im2col is the slower one (its weight gradients take 1.6-2.5x XLA's). XLA's
# convolutions here are its own kernels, not YNNPACK's (`xla_flags.py`). On GPUs and
# TPUs XLA's convolution is the one to use (cuDNN, the MXU).
CONV_LOWERINGS = ("auto", "xla", "im2col")
_NHWC = jax.lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1),
                                     out_spec=(0, 3, 1, 2))


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


def conv_general_dilated(lowering: str = "auto"):
  """A drop-in for `jax.lax.conv_general_dilated` (what `flax.linen.Conv` calls) that
  computes a stride-1 NHWC convolution the LOWERING way (`CONV_LOWERINGS`), and any
  other convolution with XLA's. im2col holds kh x kw copies of the layer's input (kept
  for the backward pass when training)."""
  check_conv_lowering(lowering)

  def conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
           dimension_numbers=None, feature_group_count=1, precision=None,
           preferred_element_type=None):
    kwargs = dict(lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                  dimension_numbers=dimension_numbers,
                  feature_group_count=feature_group_count, precision=precision,
                  preferred_element_type=preferred_element_type)
    if not _takes_im2col(lowering, lhs, rhs, window_strides, **kwargs):
      return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)
    kh, kw, in_features, out_features = rhs.shape
    if isinstance(padding, str):
      padding = jax.lax.padtype_to_pads(lhs.shape[1:3], (kh, kw), (1, 1), padding)
    patches = im2col_patches(lhs, (kh, kw), padding)
    return jax.lax.dot_general(
        patches, rhs.reshape(kh * kw * in_features, out_features),
        (((3,), (0,)), ((), ())), precision=precision,
        preferred_element_type=preferred_element_type)

  return conv


def _takes_im2col(lowering, lhs, rhs, window_strides, *, lhs_dilation, rhs_dilation,
                  dimension_numbers, feature_group_count, **_) -> bool:
  if (lhs.ndim != 4 or feature_group_count != 1 or tuple(window_strides) != (1, 1)
      or any(d != 1 for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ()))
      or jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
      != _NHWC):
    return False
  if lowering == "auto":
    map_smaller_than_filter = lhs.shape[1] < rhs.shape[0] or lhs.shape[2] < rhs.shape[1]
    return jax.default_backend() == "cpu" and map_smaller_than_filter
  return lowering == "im2col"
