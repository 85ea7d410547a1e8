"""The paper's per-image transforms (sections 3.1 and 3.2), in TensorFlow, for tf.data.

Each is a small function that works eagerly and inside tf.data. Training (section 3.1):
the image is isotropically rescaled so its smallest side is S (fixed, or drawn per image
from [Smin, Smax] by `sample_scale`), one crop is taken at a random position, flipped at
random, shifted in colour (AlexNet's PCA lighting noise) and the training set's mean RGB
is subtracted. Evaluation: rescaled to Q, centre crop.

Only what is kept is decoded. The crop is planned first (`plan_crop`: the rescaled size
and the crop's position in it), then `rescaled_crop` decodes, for a JPEG, only the
window of source pixels under the crop (with the interpolation kernel's margin) and
resamples only that window. At S = 512 the crop keeps 19% of the rescaled image: decoding
and rescaling the rest was most of the host's work. The result equals rescaling the whole
image and cropping it, up to float rounding (tests/test_transforms.py measures it on real
photos). Other formats, and pixels already decoded, take that whole-image path.

The host ships uint8 crops: the colour shift is drawn here (`color_shift_rgb`, 3 numbers
an image) and added, with the mean subtraction, on the device inside the jitted step
(`vgg_jax.input_pipeline.model_inputs`). Pixels are on Caffe's 0..255 scale.
"""

from __future__ import annotations

import tensorflow as tf

# ImageNet's mean and standard deviation per RGB channel, on the 0..255 scale.
IMAGENET_MEAN_RGB = (123.68, 116.78, 103.94)
IMAGENET_STD_RGB = (58.393, 57.12, 57.375)
# AlexNet's PCA of ImageNet's RGB pixels (0..1 scale): eigenvalues and, as columns,
# eigenvectors.
PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC = ((-0.5675, 0.7192, 0.4009),
              (-0.5808, -0.0045, -0.8140),
              (-0.5836, -0.6948, 0.4203))
# tf.image.rgb_to_grayscale's weights: how an RGB mean becomes a gray one.
GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)
_AUGMENT_SALT = 0xA6


# ------------------------------------------------------------------------- decoding


def decode_image(data: tf.Tensor, channels: int = 3) -> tf.Tensor:
  """JPEG/PNG/GIF/BMP bytes -> uint8 [h, w, CHANNELS]; gray, CMYK and RGBA converted."""
  image = tf.io.decode_image(data, channels=channels, expand_animations=False)
  image.set_shape([None, None, channels])
  return image


def to_channels(image: tf.Tensor, channels: int) -> tf.Tensor:
  """Gray [h, w, 1] replicated to RGB when CHANNELS is 3; RGB made gray when it is 1."""
  have = image.shape[-1]
  if have == channels:
    return image
  if channels == 3 and have == 1:
    return tf.image.grayscale_to_rgb(image)
  if channels == 1 and have == 3:
    return tf.image.rgb_to_grayscale(image)
  raise ValueError(f"Cannot turn {have}-channel images into {channels} channels.")


# -------------------------------------------------------------------------- rescaling


def rescaled_size(height, width, size) -> tf.Tensor:
  """[height, width] (int32) of an image whose smallest side is rescaled to SIZE."""
  height, width = tf.cast(height, tf.int32), tf.cast(width, tf.int32)
  size = tf.cast(size, tf.int32)
  ratio = tf.cast(size, tf.float64) / tf.cast(tf.minimum(height, width), tf.float64)

  def scaled(side):
    return tf.maximum(size, tf.cast(tf.round(tf.cast(side, tf.float64) * ratio), tf.int32))

  return tf.stack([tf.where(height <= width, size, scaled(height)),
                   tf.where(height <= width, scaled(width), size)])


def rescale_smallest_side(image: tf.Tensor, size) -> tf.Tensor:
  """Isotropic bilinear (antialiased) rescale so the smallest side is SIZE; float32 0..255."""
  shape = tf.shape(image)
  new_size = rescaled_size(shape[0], shape[1], size)
  image = tf.cast(image, tf.float32)
  # Antialiasing only changes a reduction (and is 4x slower): enlargements skip it.
  return tf.cond(tf.cast(size, tf.int32) < tf.minimum(shape[0], shape[1]),
                 lambda: tf.image.resize(image, new_size, "bilinear", antialias=True),
                 lambda: tf.image.resize(image, new_size, "bilinear", antialias=False))


def sample_scale(seed: tf.Tensor, scale_min: int, scale_max: int) -> tf.Tensor:
  """S drawn uniformly from the integers of [SCALE_MIN, SCALE_MAX] (scale jittering)."""
  if scale_min == scale_max:
    return tf.constant(scale_min, tf.int32)
  return tf.random.stateless_uniform([], seed, minval=scale_min, maxval=scale_max + 1,
                                     dtype=tf.int32)


# ------------------------------------------------------------------------------ crops


def plan_crop(height, width, scale, crop_size: int, seed: tf.Tensor | None = None):
  """(rescaled [h, w], crop's [top, left] in it): a random position, or the centre.

  The plan of cropping CROP_SIZE x CROP_SIZE from the image of HEIGHT x WIDTH rescaled
  to smallest side SCALE, made before any pixel is decoded.
  """
  size = rescaled_size(height, width, scale)
  room = size - crop_size + 1
  if seed is None:
    return size, (room - 1) // 2
  # As tf.image.stateless_random_crop draws its offset.
  draw = tf.random.stateless_uniform([2], seed, maxval=tf.int32.max, dtype=tf.int32)
  return size, draw % room


def rescaled_crop(item: tf.Tensor, *, scale, crop_size: int, channels: int,
                  seed: tf.Tensor | None = None) -> tf.Tensor:
  """The crop of ITEM rescaled to smallest side SCALE: float32 [crop, crop, CHANNELS].

  ITEM: encoded image bytes (a scalar string) or decoded pixels [h, w, c]. Random position
  from SEED, else the centre. A JPEG is decoded only under the crop (`_jpeg_crop`).
  """
  return rescaled_crop_and_geometry(item, scale=scale, crop_size=crop_size,
                                    channels=channels, seed=seed)[0]


def rescaled_crop_and_geometry(item: tf.Tensor, *, scale, crop_size: int, channels: int,
                               seed: tf.Tensor | None = None
                               ) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
  """`rescaled_crop`, and where the crop lies: {'factor': float32 [2], the rescaled
  size over the source's (y, x); 'offset': float32 [2], the crop's top left in the
  rescaled image}. A point p of the source lands at p * factor - offset in the crop."""
  if item.dtype != tf.string:
    return _crop_of_rescaled(to_channels(item, channels), scale, crop_size, seed)
  return tf.cond(
      tf.io.is_jpeg(item),
      lambda: _jpeg_crop(item, scale, crop_size, channels, seed),
      lambda: _crop_of_rescaled(decode_image(item, channels), scale, crop_size, seed))


def _geometry(source, size, offset) -> dict[str, tf.Tensor]:
  return {"factor": tf.cast(size, tf.float32) / tf.cast(source, tf.float32),
          "offset": tf.cast(offset, tf.float32)}


def _crop_of_rescaled(image: tf.Tensor, scale, crop_size: int, seed):
  """The whole image rescaled, then cropped: the reference `_jpeg_crop` must equal."""
  shape = tf.shape(image)
  size, offset = plan_crop(shape[0], shape[1], scale, crop_size, seed)
  top, left = offset[0], offset[1]
  crop = rescale_smallest_side(image, scale)[top:top + crop_size, left:left + crop_size]
  return (tf.ensure_shape(crop, [crop_size, crop_size, image.shape[-1]]),
          _geometry(shape[:2], size, offset))


def _jpeg_crop(data: tf.Tensor, scale, crop_size: int, channels: int, seed):
  """`_crop_of_rescaled` of a JPEG, decoding only the source window under the crop.

  Output pixel i of the crop sits at (top + i + 0.5) / s - 0.5 in source pixels (s: the
  rescale factor; half-pixel centres, as tf.image.resize). The window holds those
  positions and the interpolation kernel's reach around them: 1 source pixel when
  enlarging, 1 / s when reducing (the antialiasing kernel is stretched); one more pixel
  on each side for rounding. `scale_and_translate` then resamples the window with the
  kernel tf.image.resize uses, shifted by the window's offset.
  """
  shape = tf.image.extract_jpeg_shape(data)
  height, width = shape[0], shape[1]
  size, offset = plan_crop(height, width, scale, crop_size, seed)
  source = tf.cast(tf.stack([height, width]), tf.float32)
  factor = tf.cast(size, tf.float32) / source            # s per axis
  reach = tf.maximum(1.0, 1.0 / factor) + 1.0
  offset_f = tf.cast(offset, tf.float32)
  start = tf.floor(offset_f / factor - reach)
  stop = tf.math.ceil((offset_f + crop_size) / factor + reach)
  start = tf.cast(tf.maximum(start, 0.0), tf.int32)
  stop = tf.cast(tf.minimum(stop, source), tf.int32)
  window = tf.image.decode_and_crop_jpeg(
      data, tf.concat([start, stop - start], 0), channels=channels)
  translation = tf.cast(start, tf.float32) * factor - offset_f
  # antialias=True stretches the kernel by 1 / s only when s < 1: an enlargement gets
  # plain bilinear weights, as tf.image.resize without antialiasing.
  crop = tf.raw_ops.ScaleAndTranslate(
      images=window[None], size=[crop_size, crop_size], scale=factor,
      translation=translation, kernel_type="triangle", antialias=True)[0]
  return (tf.ensure_shape(crop, [crop_size, crop_size, channels]),
          _geometry(shape[:2], size, offset))


def flips(seed: tf.Tensor) -> tf.Tensor:
  """Whether `random_flip` with SEED mirrors (probability 1/2): the draw of
  tf.image.stateless_random_flip_left_right, so that boxes can follow the image."""
  return tf.random.stateless_uniform([], seed, minval=0, maxval=1.0) < 0.5


def random_flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """Mirrors the image [h, w, c] left to right with probability 1/2."""
  return tf.cond(flips(seed), lambda: tf.reverse(image, [1]), lambda: image)


def to_uint8(image: tf.Tensor) -> tf.Tensor:
  """Float pixels on 0..255 rounded to the nearest uint8 level (what leaves the host)."""
  return tf.saturate_cast(tf.round(image), tf.uint8)


# --------------------------------------------------------------------- colour, mean


def color_shift_rgb(seed: tf.Tensor, std: float = 0.1) -> tf.Tensor:
  """AlexNet's PCA colour shift of one image: eigvec @ (alpha * eigval) * 255, float32 [3].

  alpha ~ N(0, STD) per image; the same shift is added to every pixel (on the device).
  """
  alpha = tf.random.stateless_normal([3], seed, stddev=std)
  return 255.0 * tf.linalg.matvec(tf.constant(PCA_EIGVEC), alpha * tf.constant(PCA_EIGVAL))


def normalize(image: tf.Tensor, mean, std=None) -> tf.Tensor:
  """(IMAGE - MEAN) / STD per channel; no division when STD is None."""
  image = tf.cast(image, tf.float32) - tf.constant(mean, tf.float32)
  return image if std is None else image / tf.constant(std, tf.float32)


# ------------------------------------------------------------------ the two transforms


def augment_seed(seed, epoch, position) -> tf.Tensor:
  """The stateless seed ([2] int64) of the augmentation of one training example."""
  base = tf.constant([seed, _AUGMENT_SALT], tf.int64)
  return tf.random.experimental.stateless_fold_in(
      tf.random.experimental.stateless_fold_in(base, epoch), position)


def train_crop(item: tf.Tensor, seed: tf.Tensor, *, scale_min: int, scale_max: int,
               crop_size: int, channels: int, flip: bool = True, color_std: float = 0.1,
               boxes: tf.Tensor | None = None, box_count: tf.Tensor | None = None
               ) -> dict[str, tf.Tensor]:
  """Section 3.1 on the host: rescale to S, random crop, flip; the colour shift drawn.

  ITEM: encoded bytes or pixels [h, w, c] (0..255); SEED: [2] ints. Returns {'image':
  uint8 [crop_size, crop_size, CHANNELS], 'color_shift': float32 [CHANNELS]} (zeros for
  gray images or COLOR_STD 0): `input_pipeline.model_inputs` adds it and subtracts the
  mean on the device. With the image's BOXES (float32 [K, 4] of which the first
  BOX_COUNT are real; appendix A), also the box the crop should predict ('box', see
  `box_target`) and its loss weight ('box_weight').
  """
  scale_seed, crop_seed, flip_seed, color_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 4))
  image, geometry = rescaled_crop_and_geometry(
      item, scale=sample_scale(scale_seed, scale_min, scale_max), crop_size=crop_size,
      channels=channels, seed=crop_seed)
  image = to_uint8(image)
  if flip:
    image = random_flip(image, flip_seed)
  if color_std and channels == 3:
    shift = color_shift_rgb(color_seed, color_std)
  else:
    shift = tf.zeros([channels], tf.float32)
  out = {"image": image, "color_shift": shift}
  if boxes is not None:
    flipped = flips(flip_seed) if flip else tf.constant(False)
    out["box"], out["box_weight"] = box_target(
        boxes_in_crop(boxes, geometry, crop_size, flipped), box_count, crop_size)
  return out


def eval_crop(item: tf.Tensor, *, scale, crop_size: int, channels: int) -> tf.Tensor:
  """Section 3.2 (single crop) on the host: rescale to Q = SCALE, centre crop; uint8."""
  return to_uint8(rescaled_crop(item, scale=scale, crop_size=crop_size, channels=channels))


# ----------------------------------------------------------- boxes (appendix A)


def boxes_in_crop(boxes: tf.Tensor, geometry: dict[str, tf.Tensor], crop_size: int,
                  flipped) -> tf.Tensor:
  """BOXES [..., 4] (xmin, ymin, xmax, ymax in source pixels) in the frame of the crop
  that GEOMETRY describes (`rescaled_crop_and_geometry`), mirrored when FLIPPED; not
  clipped."""
  fy, fx = tf.unstack(geometry["factor"])
  top, left = tf.unstack(geometry["offset"])
  xmin, ymin, xmax, ymax = tf.unstack(tf.cast(boxes, tf.float32), axis=-1)
  xmin, xmax = xmin * fx - left, xmax * fx - left
  ymin, ymax = ymin * fy - top, ymax * fy - top
  size = tf.cast(crop_size, tf.float32)
  xmin, xmax = (tf.where(flipped, size - xmax, xmin), tf.where(flipped, size - xmin, xmax))
  return tf.stack([xmin, ymin, xmax, ymax], axis=-1)


def box_target(boxes: tf.Tensor, box_count, crop_size: int) -> tuple[tf.Tensor, tf.Tensor]:
  """(target float32 [4], weight float32) of a training crop from the image's boxes in
  the crop's frame (float32 [K, 4], the first BOX_COUNT real).

  The target is the box of which the crop shows most, clipped to the crop, as (centre x,
  centre y, width, height) in units of the crop side. A crop that shows none of the
  object (every box clipped to nothing) gets weight 0 rather than a made-up box: it then
  teaches nothing. (At S = 256 a 224 crop keeps most of nearly every object.)
  """
  size = tf.cast(crop_size, tf.float32)
  clipped = tf.clip_by_value(boxes, 0.0, size)
  area = ((clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
          * tf.cast(tf.range(tf.shape(boxes)[0]) < tf.cast(box_count, tf.int32),
                    tf.float32))
  best = clipped[tf.argmax(area)]
  target = tf.stack([(best[0] + best[2]) / 2, (best[1] + best[3]) / 2,
                     best[2] - best[0], best[3] - best[1]]) / size
  return target, tf.cast(tf.reduce_max(area) > 0, tf.float32)
