"""Localisation (appendix A) through the real code paths, small: boxes follow every
augmentation of the input pipeline, the box head, the Euclidean objective, a
localisation net trained from a classification checkpoint (every layer but fc8 copied;
"fc" freezes the convs), and the paper's two test protocols (`vgg_jax.localize`)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from experiments import localization_data
from vgg_jax import box_files
from vgg_jax import boxes as boxes_lib
from vgg_jax import checkpointing
from vgg_jax import fashion_mnist
from vgg_jax import input_pipeline
from vgg_jax import localization
from vgg_jax import localize
from vgg_jax import models
from vgg_jax import photos
from vgg_jax import surgery
from vgg_jax import train
from vgg_jax import transforms
import test_train  # pylint: disable=g-bad-import-order  (tests/ is on sys.path)

needs_fashion_mnist = pytest.mark.skipif(
    not fashion_mnist.has_files(fashion_mnist.DEBIAN_DIR),
    reason=f"needs Debian's Fashion-MNIST ({fashion_mnist.INSTALL_COMMAND})")


def real_photo(index: int = 0) -> bytes:
  location = photos.foolbox_data_dir()
  if location is None or not os.path.isdir(location):
    pytest.skip("needs foolbox's photos (pip install -e '.[test]')")
  path = sorted(p for p in os.listdir(location) if p.endswith(".jpg"))[index]
  with open(os.path.join(location, path), "rb") as f:
    return f.read()


# ------------------------------------------------------------------ the pipeline


def test_random_flip_draws_as_tf_image_does():
  """Classification streams are unchanged by `flips` (which lets boxes follow)."""
  image = tf.reshape(tf.range(2 * 3 * 1, dtype=tf.int32), (2, 3, 1))
  for i in range(20):
    seed = tf.constant([i, 5], tf.int64)
    np.testing.assert_array_equal(
        transforms.random_flip(image, seed),
        tf.image.stateless_random_flip_left_right(image, seed))


@pytest.mark.parametrize("index", range(4))
def test_boxes_follow_rescale_crop_and_flip_on_real_photos(index):
  """A box painted into the photo's mask ends, after the training transform (S drawn
  from [256, 512], a random 224 crop, a random flip), where the box target says; and
  the target equals numpy's `boxes.to_crop_frame` of the crop's geometry."""
  jpeg = real_photo(index)
  height, width = tf.image.extract_jpeg_shape(jpeg).numpy()[:2]
  rng = np.random.default_rng(index)
  x0, y0 = rng.uniform(0, width * 0.6), rng.uniform(0, height * 0.6)
  box = np.array([x0, y0, x0 + width * 0.35, y0 + height * 0.35], np.float32)
  mask = np.zeros((height, width, 3), np.uint8)
  mask[int(np.ceil(box[1])):int(box[3]), int(np.ceil(box[0])):int(box[2])] = 255
  kwargs = dict(scale_min=256, scale_max=512, crop_size=224, channels=3, flip=True,
                color_std=0.0, boxes=tf.constant(box[None]), box_count=tf.constant(1))
  for trial in range(6):
    seed = tf.constant([index, trial], tf.int64)
    on_photo = transforms.train_crop(tf.constant(jpeg), seed, **kwargs)
    on_mask = transforms.train_crop(tf.constant(mask), seed, **kwargs)
    np.testing.assert_allclose(on_photo["box"], on_mask["box"], atol=1e-6)
    if float(on_mask["box_weight"]) == 0:  # the crop missed the box: no target
      assert not (on_mask["image"].numpy() > 127).any()
      continue
    seen = on_mask["image"].numpy()[..., 0] > 127
    rows, cols = np.flatnonzero(seen.any(1)), np.flatnonzero(seen.any(0))
    painted = np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], np.float32)
    target = boxes_lib.from_center_size(on_mask["box"].numpy()) * 224
    np.testing.assert_allclose(target, painted, atol=2.0)  # interpolation blurs edges
    # The numpy reference, from the same plan (S, crop position, flip).
    scale_seed, crop_seed, flip_seed, _ = tf.unstack(
        tf.random.experimental.stateless_split(seed, 4))
    scale = transforms.sample_scale(scale_seed, 256, 512)
    _, geometry = transforms.rescaled_crop_and_geometry(
        tf.constant(jpeg), scale=scale, crop_size=224, channels=3, seed=crop_seed)
    reference = boxes_lib.to_crop_frame(
        box.astype(np.float64), factor=geometry["factor"].numpy(),
        offset=geometry["offset"].numpy(), crop_size=224,
        flipped=bool(transforms.flips(flip_seed)))
    np.testing.assert_allclose(target, reference, atol=1e-3)


def test_the_target_is_the_box_the_crop_shows_most():
  in_crop = tf.constant([[-50.0, -50, 10, 10], [100, 100, 300, 300], [0, 0, 0, 0]])
  target, weight = transforms.box_target(in_crop, 2, 224)
  np.testing.assert_allclose(target, np.array([162, 162, 124, 124]) / 224, rtol=1e-6)
  assert float(weight) == 1
  _, weight = transforms.box_target(tf.constant([[300.0, 0, 400, 50]]), 1, 224)
  assert float(weight) == 0  # outside the crop: no target
  _, weight = transforms.box_target(in_crop, 0, 224)
  assert float(weight) == 0  # no box at all


@pytest.fixture(scope="module")
def box_dir(tmp_path_factory):
  if not fashion_mnist.has_files(fashion_mnist.DEBIAN_DIR):
    pytest.skip(f"needs Debian's Fashion-MNIST ({fashion_mnist.INSTALL_COMMAND})")
  root = str(tmp_path_factory.mktemp("localization"))
  localization_data.write(root, num_train=64, num_val=16, seed=0)
  return root


def box_config(box_dir, **overrides):
  """Net A at 1/16 width on the demo's images: S = 40, 32x32 crops, batches of 16."""
  return test_train.tiny_config(**dict(dict(
      dataset=f"boxes:{box_dir}", train_split="train", eval_split="val", channels=3,
      train_scale_min=40, train_scale_max=40, eval_scale=40, crop_size=32,
      mean_rgb="imagenet", normalize_std=True, num_epochs=2, eval_every_steps=4,
      checkpoint_every_steps=4), **overrides))


def test_validation_batches_carry_what_the_first_protocol_needs(box_dir):
  config = box_config(box_dir, box_regression="per_class", batch_size=8)
  split = box_files.read_split(box_dir, "val")
  batch = next(iter(input_pipeline.eval_batches(config)))
  flat = {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items()}
  n = len(flat["mask"])
  np.testing.assert_array_equal(flat["boxes"], split.boxes[:n])
  np.testing.assert_array_equal(flat["box_count"], split.counts[:n])
  # The centre crop's target, mapped back to the image, is the ground-truth box where
  # the crop holds it whole (else its part inside the crop).
  back = np.asarray(localization.source_boxes(
      jnp.asarray(flat["box"]), jnp.asarray(flat["factor"]), jnp.asarray(flat["offset"]),
      32))
  whole = boxes_lib.iou(back, split.boxes[:n, 0]) > 0.999
  assert whole.sum() >= 1
  assert (boxes_lib.iou(back, split.boxes[:n, 0]) > 0.0).all() or (
      flat["box_weight"] == 0).any()


# ---------------------------------------------------------------------- the net


@pytest.mark.parametrize("regression, width", [("single_class", 4), ("per_class", 40)])
def test_box_head_dense_at_the_crop_size_is_the_crop_prediction(regression, width):
  model = models.create_model("A", num_classes=10, width=1 / 16, fc_width=16,
                              box_regression=regression)
  params = models.init_params(model, jax.random.key(0), (32, 32, 3))
  assert params["fc8"]["kernel"].shape[-1] == width
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  crop = model.apply({"params": params}, images)
  dense = model.apply({"params": params}, images, dense=True)
  assert dense.shape == (2, 1, 1, width)
  np.testing.assert_allclose(dense[:, 0, 0], crop, rtol=1e-5, atol=1e-6)


def test_per_class_regression_penalises_only_the_label_box():
  outputs = jnp.zeros((2, 12))  # 3 classes
  batch = {"label": jnp.array([2, 0]), "box": jnp.array([[0.5, 0.5, 0.2, 0.4]] * 2),
           "box_weight": jnp.array([1.0, 1.0])}
  grad = jax.grad(lambda o: localization.train_loss(o, batch)[0])(outputs)
  touched = np.asarray(grad != 0).reshape(2, 3, 4).any(-1)
  np.testing.assert_array_equal(touched, [[False, False, True], [True, False, False]])
  loss, measures = localization.train_loss(outputs, batch)
  # Caffe's Euclidean loss: sum of squared errors / (2 N).
  assert float(loss) == pytest.approx(2 * (0.25 + 0.25 + 0.04 + 0.16) / 4)
  assert float(measures["box_hit"]) == 0


# ------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def trained(box_dir, tmp_path_factory):
  """A classification net, then a localisation net (PCR, FC layers only) from it."""
  root = tmp_path_factory.mktemp("runs")
  classifier = box_config(box_dir)
  train.train_and_evaluate(classifier, str(root / "classifier"))
  config = box_config(box_dir, box_regression="per_class", trainable_layers="fc",
                      learning_rate=0.01)
  config.init_from.checkpoint = str(root / "classifier")
  config.init_from.rule = "all_but_fc8"
  result = train.train_and_evaluate(config, str(root / "pcr_fc"))
  return root, config, result


def test_a_localisation_net_from_a_classification_net(trained):
  root, config, result = trained
  assert result["confusion"] is None and 0 <= result["loc_error"] <= 1
  assert result["examples"] == 16
  source, _ = checkpointing.load_params(str(root / "classifier"))
  tuned, meta = checkpointing.load_params(str(root / "pcr_fc"))
  assert meta["step"] == 8
  assert tuned["fc8"]["kernel"].shape[-1] == 4 * 10
  for layer in models.conv_names("A"):  # frozen: exactly the classification net's
    for name in ("kernel", "bias"):
      np.testing.assert_array_equal(tuned[layer][name], source[layer][name])
  assert not np.array_equal(tuned["fc7"]["kernel"], source["fc7"]["kernel"])
  records = test_train.read_jsonl(str(root / "pcr_fc" / checkpointing.METRICS_FILE))
  assert any("train_box_hit" in r for r in records)
  assert any("eval_loc_error" in r for r in records)


def test_initialisation_copies_every_layer_but_the_last(trained):
  root, config, _ = trained
  source, _ = checkpointing.load_params(str(root / "classifier"))
  model = models.from_config(config, num_classes=10)
  fresh = models.init_params(model, jax.random.key(3), models.input_shape(config))
  params, _ = surgery.init_params_from(config, fresh)
  for layer in source:
    for name in source[layer]:
      if layer == "fc8":
        np.testing.assert_array_equal(params[layer][name], fresh[layer][name])
      else:
        np.testing.assert_array_equal(params[layer][name], source[layer][name])


def test_a_bad_box_file_stops_before_training(box_dir, tmp_path):
  bad = tmp_path / "boxes"
  bad.mkdir()
  for name in ("val.csv", "classes.txt"):
    (bad / name).write_text((open(os.path.join(box_dir, name)).read()).replace(
        "images/", os.path.join(box_dir, "images") + "/"))
  rows = open(os.path.join(box_dir, "train.csv")).read().replace(
      "images/", os.path.join(box_dir, "images") + "/").splitlines()
  rows[1] = ",".join(rows[1].split(",")[:2] + ["30", "10", "20", "40"])
  rows[2] = rows[2].replace("/images/", "/missing/")
  (bad / "train.csv").write_text("\n".join(rows) + "\n")
  config = box_config(str(bad), box_regression="single_class")
  with pytest.raises(ValueError, match=r"(?s)train.csv has bad rows:.*xmax <= xmin.*"
                     r"line 2.*missing or unreadable images on line 3"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists() or not os.listdir(tmp_path / "run")


def test_localisation_needs_a_dataset_with_boxes(tmp_path):
  config = test_train.tiny_config(dataset="fashion_mnist_local", box_regression="per_class")
  with pytest.raises(ValueError, match="needs images with boxes: config.dataset='boxes:"):
    train.train_and_evaluate(config, str(tmp_path))
  assert not os.listdir(tmp_path)



# -------------------------------------------------------------- the protocols


def test_map_boxes_puts_each_position_where_its_window_is():
  """Position (i, j) of a dense map sees the crop at (32 i, 32 j) of the rescaled
  image: a box predicted there in crop units lands there in source pixels."""
  outputs = np.zeros((2, 3, 8), np.float32)  # 2 classes (PCR) on a 2x3 map
  outputs[..., 4:] = [0.5, 0.5, 0.25, 0.5]   # class 1: centred, a quarter wide
  found = localize.map_boxes(outputs, np.array([1]), np.array([2.0, 0.5]), 64)
  assert found.shape == (1, 6, 4)
  # Position 5 = (1, 2): its window at (32, 64); the box spans 24..40 x 16..48 there.
  np.testing.assert_allclose(found[0, 5], [(64 + 24) / 0.5, (32 + 16) / 2,
                                          (64 + 40) / 0.5, (32 + 48) / 2])


def test_both_protocols_on_a_trained_pair(trained, tmp_path):
  root, config, _ = trained
  net = localize.load_localization_net(str(root / "pcr_fc"))
  classifier = localize.load_classifier(str(root / "classifier"), net)
  rows = localize.localization_table([net, net], classifier, [40, 64], "val")
  assert [r["protocol"] for r in rows] == ["center crop, ground-truth class"] * 2 + [
      "dense, greedy merging"] * 3  # each net, then the two fused
  center, dense = rows[0], rows[2]
  assert center["images"] == dense["images"] == 16
  assert 0 <= center["gt_class_loc_error"] <= 1
  assert 0 <= dense["top5_loc_error"] <= dense["top1_loc_error"] <= 1
  # The same net fused with itself: every box twice, merged to the same guesses.
  assert rows[4]["top1_loc_error"] == dense["top1_loc_error"]
  text = localize.write_table(str(tmp_path), rows, dict(dataset="d", split="val"))
  assert "| A (pcr_fc) | dense, greedy merging | 40,64 | – |" in text
  assert (tmp_path / "localization_table.json").exists()


def test_localize_refuses_a_classifier_as_a_localisation_net(trained):
  root, _, _ = trained
  result = subprocess.run(
      [sys.executable, "-m", "vgg_jax.localize", f"--workdirs={root / 'classifier'}"],
      cwd=test_train.REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  assert "holds a classification net: give localisation runs" in result.stderr
  assert "Traceback" not in result.stderr
