"""Tests of vgg_jax.models: Table 1/2 nets, the public contract, dense evaluation, LRN.

Full-size nets are only traced (jax.eval_shape); forward passes use width 1/16 nets with
fc_width 32 on 32..128 pixel images, so the file runs in seconds on a CPU. Their
parameters are drawn with RBG keys: XLA compiles their random bits several times faster
than threefry's, and initialisation compile time dominates these tests on a CPU.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vgg_jax import layers
from vgg_jax import models

# Table 2 of the paper, exact counts with 1000 classes and biases.
PARAMS = {
    "A": 132_863_336,
    "A-LRN": 132_863_336,
    "B": 133_047_848,
    "C": 133_638_952,
    "D": 138_357_544,
    "E": 143_667_240,
    "B-5x5": 134_503_528,
}
ALIASES = {"vgg11": "A", "vgg11_lrn": "A-LRN", "vgg13": "B", "vgg16_conv1": "C",
           "vgg16": "D", "vgg19": "E", "vgg13_5x5": "B-5x5"}
TINY = dict(width=1 / 16, fc_width=32, num_classes=10)


def abstract_params(model, size=224, channels=3):
  """Parameter shapes of `model` on size x size images, without allocating them."""
  images = jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)
  init = functools.partial(model.init, train=False)
  return jax.eval_shape(init, jax.random.key(0), images)["params"]


def key(seed):
  return jax.random.key(seed, impl="rbg")


def images_of(size, n=2, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.standard_normal((n, size, size, 3), np.float32))


@functools.lru_cache(maxsize=None)
def tiny_variables(name="D", size=64, init="he"):
  """A width 1/16 net trained on size x size crops, and its variables (cached)."""
  model = models.create_model(name, init=init, **TINY)
  return model, model.init(key(1), images_of(size), train=False)


# ---------------------------------------------------------------- Table 1 and Table 2


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_parameter_counts_match_table_2(name):
  params = abstract_params(models.create_model(name))
  assert models.count_params(params) == PARAMS[name]


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_aliases_resolve(alias):
  model = models.create_model(alias)
  assert model.net == ALIASES[alias]
  assert models.canonical_name(alias.upper()) == ALIASES[alias]
  assert models.layer_specs(alias) == models.layer_specs(ALIASES[alias])


def test_config_names_are_case_insensitive():
  assert models.canonical_name("a-lrn") == "A-LRN"
  assert models.canonical_name("d") == "D"


def test_parameter_names_follow_caffe():
  params = abstract_params(models.create_model("D"))
  convs = [f"conv{stage}_{i}" for stage, n in zip(range(1, 6), (2, 2, 3, 3, 3))
           for i in range(1, n + 1)]
  assert sorted(params) == sorted(convs + ["fc6", "fc7", "fc8"])
  assert list(models.conv_names("D")) == convs
  for name in params:
    assert set(params[name]) == {"kernel", "bias"}
  assert params["conv1_1"]["kernel"].shape == (3, 3, 3, 64)
  assert params["conv5_3"]["kernel"].shape == (3, 3, 512, 512)
  assert params["fc6"]["kernel"].shape == (7 * 7 * 512, 4096)
  assert params["fc8"]["kernel"].shape == (4096, 1000)
  # E has four convs in stages 3-5; A-LRN's LRN has no parameters.
  assert "conv5_4" in abstract_params(models.create_model("E"))
  assert sorted(abstract_params(models.create_model("A-LRN"))) == sorted(
      abstract_params(models.create_model("A")))


def test_net_c_has_1x1_convs_and_filter_size_override_keeps_them():
  c = abstract_params(models.create_model("C"))
  assert c["conv3_3"]["kernel"].shape == (1, 1, 256, 256)
  assert c["conv4_3"]["kernel"].shape == (1, 1, 512, 512)
  assert c["conv3_2"]["kernel"].shape == (3, 3, 256, 256)
  c5 = abstract_params(models.create_model("C", filter_size=5))
  assert c5["conv3_3"]["kernel"].shape == (1, 1, 256, 256)
  assert c5["conv3_2"]["kernel"].shape == (5, 5, 256, 256)
  d5 = abstract_params(models.create_model("D", filter_size=5))
  for name, layer in d5.items():
    if name.startswith("conv"):
      assert layer["kernel"].shape[:2] == (5, 5), name
  # B-5x5 is B's depth-vs-filter-size ablation: one 5x5 conv per stage.
  b5 = abstract_params(models.create_model("B-5x5"))
  assert b5["conv2_1"]["kernel"].shape == (5, 5, 64, 128)
  assert "conv2_2" not in b5


def test_fc6_inputs_follow_image_size():
  params = abstract_params(models.create_model("A", width=0.25), size=96)
  assert params["fc6"]["kernel"].shape == ((96 // 32) ** 2 * 128, 4096)


# ---------------------------------------------------------------- the public contract


def test_logits_shape_through_public_contract():
  model = models.create_model("A", **TINY)
  images = images_of(48, n=3)
  variables = model.init(jax.random.key(0), images, train=False)  # a default key
  logits = model.apply(variables, images, train=False)
  assert logits.shape == (3, 10)
  assert logits.dtype == jnp.float32
  assert set(variables) == {"params"}


def test_train_mode_applies_dropout():
  model, variables = tiny_variables()
  images = images_of(64)
  eval_logits = model.apply(variables, images, train=False)
  train_a = model.apply(variables, images, train=True, rngs={"dropout": key(2)})
  train_b = model.apply(variables, images, train=True, rngs={"dropout": key(3)})
  assert train_a.shape == eval_logits.shape
  assert np.all(np.isfinite(train_a))
  assert not np.allclose(train_a, eval_logits)
  assert not np.allclose(train_a, train_b)
  # Eval is deterministic and needs no rng.
  np.testing.assert_array_equal(eval_logits, model.apply(variables, images, train=False))


# ---------------------------------------------------------------- dense evaluation


def fc_head(params, window):
  """fc6 -> ReLU -> fc7 -> ReLU -> fc8 on [N, h, w, C] windows, written out in numpy."""
  x = np.asarray(window, np.float64).reshape(window.shape[0], -1)
  for name in models.HEAD:
    x = x @ np.asarray(params[name]["kernel"], np.float64) + np.asarray(
        params[name]["bias"], np.float64)
    if name != models.HEAD[-1]:
      x = np.maximum(x, 0)
  return x


def test_dense_application_at_training_size_equal_logits():
  model, variables = tiny_variables()
  images = images_of(64)
  logits = model.apply(variables, images, train=False)
  scores = model.apply({"params": variables["params"]}, images, train=False, dense=True)
  assert scores.shape == (2, 1, 1, 10)
  scale = float(np.abs(logits).max())
  assert scale > 0.1  # "he" init: logits far from zero, so the tolerance means something.
  np.testing.assert_allclose(scores[:, 0, 0], logits, rtol=1e-5, atol=1e-5 * scale)


def test_dense_application_on_larger_image_slide_the_head_over_conv_features():
  model, variables = tiny_variables()  # trained on 64 px: fc6 is a 2x2 window of features
  params = variables["params"]
  big = images_of(128, seed=5)
  scores = np.asarray(model.apply({"params": params}, big, train=False, dense=True))
  assert scores.shape == (2, 3, 3, 10)  # features 4x4, window 2x2 -> 3x3 positions

  dense, state = model.apply(variables, big, train=False, dense=True,
                             mutable=["intermediates"])
  np.testing.assert_array_equal(dense, scores)
  (features,) = state["intermediates"]["features"]
  assert features.shape == (2, 4, 4, 32)  # 128 / 32 = 4; 512 / 16 channels
  scale = np.abs(scores).max()
  for i in range(3):
    for j in range(3):
      expected = fc_head(params, features[:, i:i + 2, j:j + 2, :])
      np.testing.assert_allclose(scores[:, i, j], expected, rtol=1e-4, atol=1e-5 * scale)


def test_dense_application_differ_from_crop_logits():
  """Section 3.2: a dense position sees the real image around the window where a crop
  sees zero padding, which is why dense and multi-crop evaluation are complementary."""
  model, variables = tiny_variables()
  big = images_of(128, seed=5)
  scores = np.asarray(model.apply({"params": variables["params"]}, big, train=False,
                                   dense=True))
  scale = np.abs(scores).max()
  for i, j in ((0, 0), (1, 1), (2, 2)):
    crop = big[:, 32 * i:32 * i + 64, 32 * j:32 * j + 64, :]  # the window's own pixels
    crop_logits = np.asarray(model.apply(variables, crop, train=False))
    assert np.abs(crop_logits - scores[:, i, j]).max() > 5e-2 * scale, (i, j)


def test_dense_evaluation_rejects_images_smaller_than_training_crop():
  model, variables = tiny_variables()
  with pytest.raises(ValueError, match=r"at least\s+as large as the training crop"):
    model.apply({"params": variables["params"]}, images_of(32), train=False, dense=True)


# ---------------------------------------------------------------- LRN (net A-LRN)


def lrn_loop(a, size=5, alpha=1e-4, beta=0.75, k=2.0):
  """AlexNet's formula read literally: for each channel c of N,
  b_c = a_c / (k + alpha * sum_{j=max(0, c-n/2)}^{min(N-1, c+n/2)} a_j^2) ** beta."""
  a = np.asarray(a, np.float64)
  channels = a.shape[-1]
  b = np.empty_like(a)
  for c in range(channels):
    lo, hi = max(0, c - size // 2), min(channels - 1, c + size // 2)
    total = np.zeros(a.shape[:-1])
    for j in range(lo, hi + 1):
      total += a[..., j] ** 2
    b[..., c] = a[..., c] / (k + alpha * total) ** beta
  return b


@pytest.mark.parametrize("hyper", [models.ALEXNET_LRN,
                                   dict(size=3, alpha=1e-3, beta=0.5, k=1.0)])
def test_local_response_norm_matches_alexnet_formula(hyper):
  # Values around 100 make alpha * sum(a^2) of order 1, so the normaliser matters.
  rng = np.random.default_rng(0)
  a = jnp.asarray(100 * rng.standard_normal((2, 3, 4, 9), np.float32))
  b = layers.local_response_norm(a, **hyper)
  expected = lrn_loop(a, **hyper)
  assert b.shape == a.shape
  np.testing.assert_allclose(b, expected, rtol=1e-5, atol=1e-6)
  assert not np.allclose(expected, np.asarray(a) / hyper["k"] ** hyper["beta"], rtol=1e-3)


def test_a_lrn_applies_lrn_after_first_conv():
  specs = models.layer_specs("A-LRN")
  kinds = [models.ConvSpec, models.LRNSpec, models.PoolSpec]
  assert [type(s) for s in specs[:3]] == kinds
  assert not any(isinstance(s, models.LRNSpec) for s in models.layer_specs("A"))
  model_a, variables = tiny_variables("A", size=32, init="glorot")
  model_lrn = models.create_model("A-LRN", **TINY)
  images = 50 * images_of(32)
  logits_a = model_a.apply(variables, images, train=False)
  logits_lrn = model_lrn.apply(variables, images, train=False)  # same parameter tree
  assert not np.allclose(logits_a, logits_lrn, rtol=1e-3)


# ---------------------------------------------------------------- init and precision


def kernels(params):
  return {name: np.asarray(layer["kernel"]) for name, layer in params.items()}


def test_paper_init_is_normal_std_001_with_zero_biases():
  params = tiny_variables("A", size=32, init="paper")[1]["params"]
  values = np.concatenate([k.ravel() for k in kernels(params).values()])
  assert values.size > 30_000
  assert values.std() == pytest.approx(0.01, rel=0.03)
  assert abs(values.mean()) < 3e-4
  for name, layer in params.items():
    np.testing.assert_array_equal(layer["bias"], 0, err_msg=name)
    assert layer["kernel"].dtype == jnp.float32


def test_glorot_init_differs_from_paper():
  paper = tiny_variables("A", size=32, init="paper")[1]["params"]
  glorot = tiny_variables("A", size=32, init="glorot")[1]["params"]
  kernel = np.asarray(glorot["conv4_1"]["kernel"])  # 3x3, 16 -> 32 channels (A, 1/16)
  fan_in, fan_out = 9 * 16, 9 * 32
  # Glorot uniform: variance 2 / (fan_in + fan_out), here about 0.068**2, not 0.01**2.
  assert kernel.std() == pytest.approx(np.sqrt(2 / (fan_in + fan_out)), rel=0.1)
  assert np.asarray(paper["conv4_1"]["kernel"]).std() == pytest.approx(0.01, rel=0.1)


def test_bfloat16_compute_keeps_float32_params_and_close_logits():
  model32, variables = tiny_variables()
  model16 = models.create_model("D", init="he", dtype=jnp.bfloat16, **TINY)
  images = images_of(64)
  shapes16 = jax.eval_shape(functools.partial(model16.init, train=False), key(1), images)
  for leaf in jax.tree_util.tree_leaves(shapes16):
    assert leaf.dtype == jnp.float32
  logits32 = model32.apply(variables, images, train=False)
  logits16 = model16.apply(variables, images, train=False)
  assert logits16.dtype == jnp.float32
  scale = float(np.abs(logits32).max())
  np.testing.assert_allclose(logits16, logits32, atol=0.05 * scale)
  assert not np.array_equal(logits16, logits32)  # bf16 really was used


# ---------------------------------------------------------------- bad input


def test_unknown_config_name():
  with pytest.raises(ValueError, match=r"'F'.*known names: A, A-LRN, B"):
    models.create_model("F")
  with pytest.raises(ValueError, match=r"'vgg17'.*vgg16"):
    models.layer_specs("vgg17")


@pytest.mark.parametrize("width", [0, -0.5])
def test_bad_width(width):
  pattern = rf"width must be > 0.*got {re.escape(repr(width))}"
  with pytest.raises(ValueError, match=pattern):
    models.create_model("D", width=width)


@pytest.mark.parametrize("filter_size", [2, 4, 0])
def test_even_or_zero_filter_size(filter_size):
  with pytest.raises(ValueError, match=rf"positive odd integer.*got {filter_size}"):
    models.create_model("D", filter_size=filter_size)


def test_too_small_input():
  model = models.create_model("A", **TINY)
  with pytest.raises(ValueError, match=r"31x31 pixels.*at least 32 pixels"):
    model.init(key(0), images_of(31, n=1), train=False)
  with pytest.raises(ValueError, match=r"32x16 pixels.*at least 32 pixels"):
    model.init(key(0), jnp.zeros((1, 32, 16, 3)), train=False)


@pytest.mark.parametrize("knobs, pattern", [
    (dict(fc_width=0), r"fc_width must be a positive integer, got 0"),
    (dict(num_classes=0), r"num_classes must be a positive integer, got 0"),
    (dict(dropout_rate=1.0), r"dropout_rate must be in \[0, 1\), got 1.0"),
    (dict(init="xavier"), r"Unknown init 'xavier'; choose one of paper, glorot, he"),
])
def test_other_bad_knobs(knobs, pattern):
  with pytest.raises(ValueError, match=pattern):
    models.create_model("D", **knobs)
