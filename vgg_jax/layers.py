"""The nets' parameter-free layers, as array functions: AlexNet's local response
normalisation (net A-LRN) and 2x2 max-pooling."""

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


def max_pool_2x2(x: Array) -> Array:
  """2x2 max-pooling, stride 2, a last odd row or column dropped (as "VALID").

  Written as a reshape and a max rather than a reduce_window: the same values, and a
  gradient XLA's CPU backend computes much faster (its select-and-scatter was about a
  fifth of the demo's backward pass). Ties share the gradient instead of the first
  taking it; after a ReLU, ties are zeros, whose gradient the ReLU stops anyway."""
  n, h, w, c = x.shape
  x = x[:, :h // 2 * 2, :w // 2 * 2]
  return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
