"""Tests of vgg_jax.transforms, eagerly and inside tf.data, and of the host/device split.

The equivalences the faster pipeline rests on are measured on real photos (foolbox's
ImageNet validation photos, re-encoded at typical ImageNet sizes): decoding only the
crop's window equals rescaling the whole image and cropping it, and uint8 crops finished
on the device (`input_pipeline.model_inputs`) equal the float pipeline up to rounding.
"""

import io
import os

import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from vgg_jax import input_pipeline as ip
from vgg_jax import input_pipeline_benchmark as benchmark
from vgg_jax import photos as photos_lib
from vgg_jax import transforms as T

from tests.test_input_pipeline import jpeg_bytes, tfdata


def seeds(n, salt=7):
  return [tf.constant([i, salt], tf.int64) for i in range(n)]


@pytest.fixture(scope="module")
def photos():
  """12 real ImageNet photos as JPEGs of ImageNet's typical sizes (500x375, 375x500...)."""
  location = photos_lib.foolbox_data_dir()
  if location is None or not os.path.isdir(location):
    pytest.skip("needs foolbox's photos (pip install -e '.[test]')")
  return benchmark.reencode(benchmark.read_photos(location), 12)


# --------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("mode,channels", [("RGB", 3), ("L", 3), ("CMYK", 3), ("RGB", 1)])
def test_decode_image_makes_rgb_or_gray(mode, channels):
  data = jpeg_bytes(6, 9, mode)
  image = T.decode_image(tf.constant(data), channels).numpy()
  assert image.shape == (6, 9, channels) and image.dtype == np.uint8
  reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB" if channels == 3
                                                             else "L"), np.float32)
  assert np.abs(image.reshape(reference.shape) - reference).mean() < 3
  np.testing.assert_array_equal(tfdata(lambda d: T.decode_image(d, channels), data), image)


def test_decode_image_drops_png_alpha():
  buffer = io.BytesIO()
  Image.fromarray(np.full((4, 5, 4), 200, np.uint8), "RGBA").save(buffer, "PNG")
  assert T.decode_image(tf.constant(buffer.getvalue()), 3).shape == (4, 5, 3)


# -------------------------------------------------------------------------- rescaling


@pytest.mark.parametrize("shape,size,expected", [
    ((20, 30), 16, (16, 24)), ((30, 20), 16, (24, 16)), ((9, 9), 16, (16, 16)),
    ((5, 7), 16, (16, 22)), ((300, 200), 32, (48, 32))])
def test_rescale_smallest_side(shape, size, expected):
  image = np.random.default_rng(0).integers(0, 256, shape + (3,), dtype=np.uint8)
  eager = T.rescale_smallest_side(tf.constant(image), size).numpy()
  assert eager.shape == expected + (3,) and eager.dtype == np.float32
  assert eager.min() >= 0 and eager.max() <= 255
  np.testing.assert_allclose(tfdata(T.rescale_smallest_side, image, size), eager, atol=1e-4)


def test_rescale_keeps_a_constant_image_constant():
  image = tf.fill([13, 17, 3], tf.constant(77, tf.uint8))
  np.testing.assert_allclose(T.rescale_smallest_side(image, 32).numpy(), 77, atol=1e-3)


def test_sample_scale_stays_within_bounds():
  draws = np.array([int(T.sample_scale(s, 10, 14)) for s in seeds(200)])
  assert draws.min() == 10 and draws.max() == 14
  assert len(set(draws)) == 5
  assert int(T.sample_scale(seeds(1)[0], 12, 12)) == 12


# ------------------------------------------------------------------------------ crops


def test_plan_crop_positions_lie_inside_the_rescaled_image():
  offsets = set()
  for seed in seeds(40):
    size, (top, left) = T.plan_crop(12, 30, 12, 8, seed)
    assert tuple(size.numpy()) == (12, 30)
    assert 0 <= top <= 4 and 0 <= left <= 22
    offsets.add((int(top), int(left)))
  assert len(offsets) > 10
  size, offset = T.plan_crop(20, 10, 15, 8)      # rescaled to 30 x 15: the centre
  assert tuple(size.numpy()) == (30, 15) and tuple(offset.numpy()) == (11, 3)


def test_crop_of_pixels_is_a_window_of_the_rescaled_image():
  image = np.random.default_rng(4).integers(0, 256, (21, 14, 3), dtype=np.uint8)
  rescaled = T.rescale_smallest_side(tf.constant(image), 20).numpy()    # 30 x 20
  for seed in seeds(5):
    crop = T.rescaled_crop(tf.constant(image), scale=20, crop_size=10, channels=3,
                           seed=seed).numpy()
    _, (top, left) = T.plan_crop(21, 14, 20, 10, seed)
    np.testing.assert_array_equal(crop, rescaled[top:top + 10, left:left + 10])


@pytest.mark.parametrize("scale", [256, 288, 384, 512])
def test_jpeg_window_decode_equals_the_whole_image_rescaled_and_cropped(photos, scale):
  """Measured: mean absolute difference about 1e-4 of a level, at most 0.01, over
  these photos at S 256 (a reduction: the antialiasing kernel) to 512 (enlargements)."""
  differences = []
  for i, data in enumerate(photos):
    data, seed = tf.constant(data), tf.constant([i, scale], tf.int64)
    window = T.rescaled_crop(data, scale=scale, crop_size=224, channels=3, seed=seed)
    whole = T.rescaled_crop(T.decode_image(data, 3), scale=scale, crop_size=224,
                            channels=3, seed=seed)
    differences.append(np.abs(window.numpy() - whole.numpy()))
  differences = np.stack(differences)
  assert differences.mean() < 1e-3 and differences.max() < 0.05


@pytest.mark.parametrize("channels", [3, 1])
def test_jpeg_window_decode_at_the_borders_and_in_tf_data(channels):
  """Tiny and odd-sized JPEGs, gray output, centre and random windows touching the
  image's edges: the window path matches the whole-image path, eagerly and in tf.data."""
  for i, (height, width, scale, crop) in enumerate(
      [(3, 4, 8, 8), (21, 14, 14, 14), (40, 90, 16, 12), (90, 40, 60, 30)]):
    data = tf.constant(jpeg_bytes(height, width, seed=i))
    for seed in [None] + seeds(3, salt=i):
      kwargs = dict(scale=scale, crop_size=crop, channels=channels, seed=seed)
      window = T.rescaled_crop(data, **kwargs).numpy()
      whole = T.rescaled_crop(T.decode_image(data, channels), **kwargs).numpy()
      assert window.shape == (crop, crop, channels)
      np.testing.assert_allclose(window, whole, atol=0.05)
    graph = tfdata(lambda d: T.rescaled_crop(d, **dict(kwargs, seed=seeds(1)[0])), data)
    np.testing.assert_allclose(
        graph, T.rescaled_crop(data, **dict(kwargs, seed=seeds(1)[0])).numpy(), atol=1e-4)


def test_random_flip_mirrors_half_the_time():
  image = np.arange(4 * 5 * 3, dtype=np.float32).reshape(4, 5, 3)
  flipped = 0
  for seed in seeds(100):
    out = T.random_flip(tf.constant(image), seed).numpy()
    if np.array_equal(out, image[:, ::-1]):
      flipped += 1
    else:
      np.testing.assert_array_equal(out, image)
  assert 30 < flipped < 70


# --------------------------------------------------------------------- colour, mean


def test_color_shift_statistics():
  n, std = 2000, 0.1
  ds = tf.data.Dataset.range(n).map(
      lambda i: T.color_shift_rgb(tf.stack([i, np.int64(3)]), std))
  rgb = np.stack(list(ds.as_numpy_iterator())) / 255.0   # eigvec @ (alpha * eigval)
  alpha_eigval = rgb @ np.array(T.PCA_EIGVEC)            # eigvec is orthonormal
  np.testing.assert_allclose(alpha_eigval.std(0), std * np.array(T.PCA_EIGVAL), rtol=0.1)
  assert np.all(np.abs(alpha_eigval.mean(0)) < 4 * std * np.array(T.PCA_EIGVAL) / n**0.5)
  eager = T.color_shift_rgb(tf.constant([5, 3], tf.int64), std).numpy()
  np.testing.assert_allclose(eager, rgb[5] * 255, rtol=1e-5)


def test_normalize_subtracts_the_mean_and_divides_by_std():
  image = np.full((2, 2, 3), [130.0, 120.0, 110.0], np.float32)
  out = T.normalize(tf.constant(image), T.IMAGENET_MEAN_RGB).numpy()
  np.testing.assert_allclose(out[0, 0], [6.32, 3.22, 6.06], atol=1e-4)
  out = T.normalize(tf.constant(image), (100.0, 100.0, 100.0), (10.0, 20.0, 5.0)).numpy()
  np.testing.assert_allclose(out[1, 1], [3.0, 1.0, 2.0], atol=1e-6)


# ------------------------------------------------------- host crops + device finish


def float_pipeline(item, seed, *, scale_min, scale_max, crop_size, channels, flip,
                   color_std, mean, std):
  """The pipeline as it was before uint8 batches: all in float32 on the host."""
  scale_seed, crop_seed, flip_seed, color_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 4))
  image = item if item.dtype != tf.string else T.decode_image(item, channels)
  image = T.to_channels(image, channels)
  scale = T.sample_scale(scale_seed, scale_min, scale_max)
  _, (top, left) = T.plan_crop(tf.shape(image)[0], tf.shape(image)[1], scale, crop_size,
                               crop_seed)
  image = T.rescale_smallest_side(image, scale)[top:top + crop_size, left:left + crop_size]
  if flip:
    image = T.random_flip(image, flip_seed)
  if color_std and channels == 3:
    image = image + T.color_shift_rgb(color_seed, color_std)
  return T.normalize(image, mean, std)


@pytest.mark.parametrize("channels,std", [(3, None), (3, T.IMAGENET_STD_RGB), (1, (50.0,))])
def test_uint8_crops_finished_on_the_device_equal_the_float_pipeline(photos, channels,
                                                                     std):
  """The differences: the crop's rounding to uint8 (at most 0.5 level) and the window
  decode's float rounding (at most 0.01 level, see above), divided by the std."""
  mean = T.IMAGENET_MEAN_RGB if channels == 3 else (120.0,)
  kwargs = dict(scale_min=256, scale_max=512, crop_size=224, channels=channels,
                flip=True, color_std=0.1)
  crops, shifts, expected = [], [], []
  for i, data in enumerate(photos[:6]):
    seed = T.augment_seed(3, 1, i)
    host = tfdata(lambda d, s: T.train_crop(d, s, **kwargs), data, seed)
    assert host["image"].dtype == np.uint8 and host["image"].shape == (224, 224, channels)
    crops.append(host["image"])
    shifts.append(host["color_shift"])
    expected.append(float_pipeline(tf.constant(data), seed, mean=mean, std=std,
                                   **kwargs).numpy())
  batch = {"image": jnp.asarray(np.stack(crops)), "color_shift": jnp.asarray(np.stack(shifts)),
           "label": jnp.zeros(6, jnp.int32)}
  inputs = ip.model_inputs(batch, mean=mean, std=std)
  assert set(inputs) == {"image", "label"} and inputs["image"].dtype == jnp.float32
  tolerance = (0.5 + 0.01) / np.min(std or 1.0) + 1e-4
  np.testing.assert_allclose(np.asarray(inputs["image"]), np.stack(expected),
                             atol=tolerance, rtol=0)
  if channels == 1:
    assert not np.any(np.stack(shifts))


def test_eval_crop_is_the_rounded_centre_crop_of_the_rescaled_image():
  data = jpeg_bytes(30, 20, seed=3)
  crop = tfdata(lambda d: T.eval_crop(d, scale=12, crop_size=10, channels=3), data)
  assert crop.shape == (10, 10, 3) and crop.dtype == np.uint8
  rescaled = T.rescale_smallest_side(T.decode_image(tf.constant(data)), 12).numpy()
  np.testing.assert_allclose(crop, rescaled[4:14, 1:11], atol=0.5 + 1e-3)   # 18 x 12
