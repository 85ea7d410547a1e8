"""Tests of vgg_jax.protocols and vgg_jax.evaluate: the protocols of section 3.2 and the tables of section 4.

Tiny nets (width 1/16, fc_width 32, 32-pixel crops) over eight fake CPU devices: random
nets for the machinery, on real ImageNet photos (the 20 that foolbox ships) too, and a
net trained here for a few seconds on real Fashion-MNIST images for the table.
"""

import functools
import glob
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from vgg_jax import checkpointing
from vgg_jax import convert
from vgg_jax import evaluate
from vgg_jax import input_pipeline
from vgg_jax import main
from vgg_jax import models
from vgg_jax import pixel_stats
from vgg_jax import protocols
import test_train  # pylint: disable=g-bad-import-order  (tests/ is on sys.path)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOOLBOX_DATA = glob.glob(os.path.join(os.path.dirname(sys.executable), "..", "lib",
                                      "python3*", "site-packages", "foolbox", "data"))


def key(seed):
  return jax.random.key(seed, impl="rbg")  # compiles faster than threefry on a CPU


@functools.lru_cache(maxsize=None)
def tiny_net(name="A", channels=1, num_classes=5, crop=32):
  model = models.create_model(name, num_classes=num_classes, width=1 / 16, fc_width=32,
                              init="he")
  init = jax.jit(lambda rng: model.init(rng, jnp.zeros((1, crop, crop, channels)),
                                        train=False)["params"])  # eager: 100s of compiles
  return model, init(key(1))


def random_images(shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def net_of(config, model, params, path=""):
  config = evaluate._merged(config, {"num_classes": model.num_classes})
  return evaluate.Net(model.net, path, config, model, params, {})


# ------------------------------------------------------------ per-image protocols


def test_crop_boxes_are_a_5x5_grid_that_covers_the_image():
  height, width, crop = 40, 57, 32
  boxes = protocols.crop_boxes(height, width, crop)
  assert boxes.shape == (25, 2)
  tops, lefts = sorted(set(boxes[:, 0])), sorted(set(boxes[:, 1]))
  assert tops == [0, 2, 4, 6, 8] and len(lefts) == 5
  assert lefts[0] == 0 and lefts[-1] == width - crop
  assert max(np.diff(lefts)) - min(np.diff(lefts)) <= 1  # evenly spaced (rounded)
  assert len({tuple(b) for b in boxes}) == 25             # every (row, column) once
  covered = np.zeros((height, width), bool)
  for top, left in boxes:
    covered[top:top + crop, left:left + crop] = True
  assert covered.all()
  np.testing.assert_array_equal(protocols.crop_boxes(32, 32, 32), np.zeros((25, 2)))
  with pytest.raises(ValueError, match="Q must be at least the crop size"):
    protocols.crop_boxes(31, 40, 32)


def test_multi_crop_is_the_mean_of_its_50_crops_one_by_one():
  model, params = tiny_net()
  images = random_images((1, 40, 48, 1))
  multi = jax.jit(functools.partial(protocols.multi_crop_posteriors, model,
                                    crop_size=32))(params, images)
  one = jax.jit(lambda x: jax.nn.softmax(model.apply({"params": params}, x[None]))[0])
  for i, image in enumerate(images):
    crops = [image[t:t + 32, l:l + 32] for t, l in protocols.crop_boxes(40, 48, 32)]
    crops += [c[:, ::-1] for c in crops]
    assert len(crops) == 50
    expected = np.mean([one(c) for c in crops], axis=0)
    np.testing.assert_allclose(multi[i], expected, rtol=1e-5, atol=1e-6)
  assert np.allclose(multi.sum(-1), 1, atol=1e-5)


def test_dense_with_flips_is_invariant_to_flipping_the_input():
  model, params = tiny_net()
  images = random_images((2, 40, 72, 1), seed=1)
  dense = jax.jit(functools.partial(protocols.dense_posteriors, model))
  original, flipped = dense(params, images), dense(params, images[:, :, ::-1])
  np.testing.assert_allclose(original, flipped, rtol=1e-6, atol=1e-7)
  one_way = jax.jit(functools.partial(protocols.dense_posteriors, model, flip=False))(
      params, images)
  assert not np.allclose(one_way, original, atol=1e-4)  # the flip does matter


def test_dense_at_the_crop_size_is_the_centre_crop():
  model, params = tiny_net()
  images = random_images((3, 32, 32, 1), seed=2)
  for flip in (False, True):
    dense = functools.partial(protocols.dense_posteriors, model, flip=flip)
    centre = functools.partial(protocols.center_crop_posteriors, model, flip=flip)
    np.testing.assert_allclose(jax.jit(dense)(params, images),
                               jax.jit(centre)(params, images), rtol=1e-5, atol=1e-6)


def test_combinations_average_posteriors():
  labels, seen = np.array([0, 0]), np.array([True, True])  # the second one wrong
  a = protocols.Posteriors(np.array([[0.9, 0.1], [0.2, 0.8]], np.float32), labels, seen, 1)
  b = protocols.Posteriors(np.array([[0.3, 0.7], [0.6, 0.4]], np.float32), labels, seen, 2)
  for combined in (protocols.multi_scale([a, b]), protocols.average([a, b]),
                   protocols.ensemble([a, b])):
    np.testing.assert_allclose(combined.probs, [[0.6, 0.4], [0.4, 0.6]])
    assert combined.seconds == 3
  assert protocols.errors(protocols.ensemble([a, b])) == dict(top1_error=0.5,
                                                           top5_error=0.0, images=2)
  self_ensemble = protocols.ensemble([a, a])
  np.testing.assert_array_equal(self_ensemble.probs, a.probs)


# ------------------------------------------------------------- passes over splits


@pytest.fixture(scope="module")
def shapes_folder(tmp_path_factory):
  """13 gray images of two shapes: batches of 8 divide neither the split nor a shape."""
  root = tmp_path_factory.mktemp("shapes")
  rng = np.random.default_rng(0)
  sizes = [(28, 28), (28, 40), (28, 28)] * 4 + [(28, 28)]
  for i, (height, width) in enumerate(sizes):
    for split in ("train", "val"):
      directory = root / split / f"class_{i % 3}"
      directory.mkdir(parents=True, exist_ok=True)
      pixels = rng.integers(0, 256, (height, width), np.uint8)
      Image.fromarray(pixels).save(directory / f"{i:02d}.png")
  return str(root)


def shapes_config(root, **overrides):
  config = test_train.tiny_config(dataset=f"folder:{root}", eval_split="val",
                                  batch_size=8, mean_rgb="imagenet",
                                  normalize_std=True, train_scale_max=32)
  config.update(overrides)
  return config


def test_every_image_is_evaluated_once_in_its_own_slot(shapes_folder):
  config = shapes_config(shapes_folder)
  model, params = tiny_net(num_classes=3)
  evaluator = evaluate.Evaluator(net_of(config, model, params))
  examples = list(input_pipeline.eval_examples(config, scale=32).as_numpy_iterator())
  shapes = [e["image"].shape for e in examples]
  assert len(examples) == 13 and sorted(set(shapes)) == [(32, 32, 1), (32, 46, 1)]
  assert shapes.count((32, 32, 1)) == 9  # 8 + 1 and 4 per batch of 8
  for pass_name, per_image in (
      ("dense", jax.jit(lambda x: protocols.dense_posteriors(model, params, x))),
      ("multi_crop", jax.jit(lambda x: protocols.multi_crop_posteriors(
          model, params, x, crop_size=32)))):
    result = evaluator.posteriors(pass_name, 32)
    assert result.seen.all() and len(result.seen) == 13
    for shape in {e["image"].shape for e in examples}:  # on the host, shape by shape
      same = [e for e in examples if e["image"].shape == shape]
      index = [e["index"] for e in same]
      np.testing.assert_allclose(result.probs[index],
                                 per_image(np.stack([e["image"] for e in same])),
                                 rtol=1e-4, atol=1e-6, err_msg=pass_name)
      np.testing.assert_array_equal(result.labels[index], [e["label"] for e in same])
    if pass_name == "dense":  # 4 and 2 images per device by area: the same numbers
      bigger = evaluator.posteriors(pass_name, 32, batch_size=64)
      np.testing.assert_allclose(bigger.probs, result.probs, rtol=1e-5, atol=1e-7)


def test_a_converted_net_gets_its_input_convention(tmp_path):
  model = models.create_model("A", num_classes=5, width=1 / 16, fc_width=32)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))["params"]
  params = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  meta = dict(model="A", num_classes=5, width=1 / 16, fc_width=32, crop_size=32)
  config = test_train.tiny_config(channels=3, model="D", width=1.0, fc_width=4096)
  for name, convention in (("tv", convert.TORCHVISION), ("keras", convert.KERAS_CAFFE)):
    checkpointing.save_params(str(tmp_path / name), params,
                              dict(meta, input_convention=convention))
  net = evaluate.load_net(config, str(tmp_path / "tv"))  # its own net: A, from the meta
  assert (net.model.net, net.model.num_classes, net.config.crop_size) == ("A", 5, 32)
  assert net.config.normalize_std  # the pipeline's std: ImageNet's, torchvision's
  np.testing.assert_allclose(pixel_stats.mean_values(net.config.mean_rgb),
                             (123.675, 116.28, 103.53))
  with pytest.raises(ValueError, match="convention 'keras_caffe' is BGR"):
    evaluate.load_net(config, str(tmp_path / "keras"))


# ---------------------------------------------------------------- trained runs


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny net A trained for a few seconds on real Fashion-MNIST images (36 to test,
  which batches of 16 do not divide)."""
  if not os.path.isdir(test_train.FASHION_MNIST):
    pytest.skip("Debian's dataset-fashion-mnist is not installed")
  root = str(tmp_path_factory.mktemp("fashion"))
  test_train.write_fashion_mnist_folder(root, {"train": 160, "val": 36})
  config = test_train.tiny_config(dataset=f"folder:{root}", eval_split="val",
                                  width=1 / 8, fc_width=64, dropout_rate=0.0,
                                  train_scale_min=32, train_scale_max=40, num_epochs=1,
                                  checkpoint_every_steps=100, log_every_steps=100)
  workdir = str(tmp_path_factory.mktemp("run"))
  main.run(config.copy_and_resolve_references(), workdir)
  return config, workdir


def test_trained_run_every_protocol_gives_a_table(trained, tmp_path):
  config, workdir = trained
  rows = evaluate.evaluate_run(config, workdir)
  assert [(r["protocol"], r["scales"]) for r in rows] == [
      (p, s) for p in protocols.PROTOCOLS for s in ([32], [36], [40], [32, 36, 40])]
  assert all(r["images"] == 36 and r["seconds"] > 0 for r in rows)
  assert all(0 <= r["top5_error"] <= r["top1_error"] <= 1 for r in rows)
  with open(os.path.join(workdir, "final_eval.json")) as f:
    final = json.load(f)
  centre = rows[0]  # centre crop at Q = eval_scale = 32: the training's validation
  assert abs(centre["top1_error"] - final["top1_error"]) <= 1 / 36 + 1e-9
  assert abs(centre["top5_error"] - final["top5_error"]) <= 1 / 36 + 1e-9
  with open(os.path.join(workdir, "eval_table.json")) as f:
    assert json.load(f)["rows"] == rows
  with open(os.path.join(workdir, "eval_table.md")) as f:
    table = f.read()
  assert "| A (" in table and "| dense+multi_crop | 32,36,40 |" in table
  print(table)


def test_a_net_is_fed_the_normalisation_it_was_trained_with(trained, shapes_folder):
  """mean_rgb="compute" means the training data's statistics, also on other data."""
  config, workdir = trained
  own = pixel_stats.normalization(config, workdir=workdir)
  elsewhere = shapes_config(shapes_folder, mean_rgb="compute", normalize_std=True)
  assert pixel_stats.normalization(elsewhere) != own
  net = evaluate.load_net(elsewhere, workdir)
  assert net.mean_std == own
  image = next(evaluate.Evaluator(net)._examples("center_crop", 32, "val", None)
               .as_numpy_iterator())["image"]
  raw = next(input_pipeline.eval_examples(
      elsewhere, scale=32, crop_size=32, mean_std=((0.0,), None)).as_numpy_iterator())
  np.testing.assert_allclose(image, (raw["image"] - own[0]) / own[1], rtol=1e-5,
                             atol=1e-4)


def test_dense_pass_at_the_crop_size_equals_the_centre_crops(trained):
  config, workdir = trained
  net = evaluate.load_net(config, workdir, own_net=False)
  dense = evaluate.Evaluator(net).posteriors("dense", 32)
  crops = list(input_pipeline.eval_examples(net.config, scale=32, crop_size=32,
                                            workdir=workdir).as_numpy_iterator())
  images = np.stack([e["image"] for e in crops])
  index = np.array([e["index"] for e in crops])
  expected = jax.jit(functools.partial(protocols.center_crop_posteriors, net.model,
                                       flip=True))(net.params, images)
  np.testing.assert_allclose(dense.probs[index], expected, rtol=1e-4, atol=1e-6)


def test_bad_input_fails_before_any_work(trained, tmp_path, monkeypatch):
  config, workdir = trained

  def no_work(*args, **kwargs):
    raise AssertionError("evaluation started")
  monkeypatch.setattr(input_pipeline, "eval_examples", no_work)
  with pytest.raises(ValueError, match=r"Unknown evaluation protocol\(s\) \['dens'\]; "
                     r"choose from center_crop, dense, multi_crop, dense\+multi_crop"):
    evaluate.evaluate_run(config, workdir, protocols="dens,multi_crop")
  with pytest.raises(ValueError, match=r"Q=\[24\] are smaller than the crop size 32"):
    evaluate.evaluate_run(config, workdir, scales=[24, 32])
  other = config.copy_and_resolve_references()
  other.model = "B"
  with pytest.raises(ValueError, match=r"another architecture \(model: 'A' in the "
                     r"checkpoint, 'B' in the config\)"):
    evaluate.evaluate_run(other, workdir)
  # Weights of net A that call themselves net B (no config.json to go by).
  params, _ = checkpointing.load_params(workdir)
  checkpointing.save_params(str(tmp_path / "mislabelled"), params,
                            dict(model="B", num_classes=10, width=1 / 8, fc_width=64,
                                 crop_size=32))
  with pytest.raises(ValueError, match=r"does not fit net B .* another architecture\. "
                     r"missing \['conv1_2'\]"):
    evaluate.evaluate_run(config, str(tmp_path),
                          checkpoints=[str(tmp_path / "mislabelled")])
  assert not os.path.exists(tmp_path / "eval_table.md")


def test_command_line_names_a_missing_run(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "vgg_jax.evaluate", f"--workdir={tmp_path / 'no_such_run'}"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert "No such run directory" in result.stderr and "no_such_run" in result.stderr


def test_command_line_an_ensemble_of_a_checkpoint_with_itself_is_the_checkpoint(
    trained, tmp_path):
  _, workdir = trained
  result = subprocess.run(
      [sys.executable, "-m", "vgg_jax.evaluate", f"--workdir={tmp_path}",
       f"--checkpoints={workdir},{workdir}", "--protocol=center_crop,multi_crop",
       "--scales=40"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "| multi_crop | 40 |" in result.stdout  # the table, printed
  with open(tmp_path / "eval_table.json") as f:
    rows = json.load(f)["rows"]
  name = rows[0]["net"]
  assert [r["net"] for r in rows] == [name] * 4 + [f"{name} + {name}"] * 2
  for single, fused in zip(rows[:2], rows[4:]):
    assert single["protocol"] == fused["protocol"]
    for k in ("top1_error", "top5_error", "images"):
      assert single[k] == fused[k], k


# ------------------------------------------------------ real ImageNet photographs


@pytest.fixture(scope="module")
def imagenet_photos(tmp_path_factory):
  """foolbox's 20 ILSVRC-2012 validation photos (imagenet_<i>_<label>.jpg) as an image
  folder: val/<label>/ (and train/, which names the classes)."""
  photos = sorted(glob.glob(os.path.join(FOOLBOX_DATA[0], "imagenet_*.jpg"))
                  ) if FOOLBOX_DATA else []
  if len(photos) != 20:
    pytest.skip("foolbox 3.3.4's data/ folder is not installed")
  root = tmp_path_factory.mktemp("imagenet")
  for path in photos:
    label = int(os.path.basename(path)[:-4].split("_")[2])
    for split in ("train", "val"):
      directory = root / split / f"{label:04d}"
      directory.mkdir(parents=True, exist_ok=True)
      os.symlink(path, directory / os.path.basename(path))
  return str(root)


def test_every_protocol_on_real_imagenet_photos(imagenet_photos, tmp_path):
  config = test_train.tiny_config(
      dataset=f"folder:{imagenet_photos}", eval_split="val", model="D", channels=3,
      mean_rgb="imagenet", normalize_std=True, batch_size=8, train_scale_max=32)
  model, params = tiny_net("D", channels=3, num_classes=19)
  checkpointing.save_params(str(tmp_path), params, dict(model="D", num_classes=19))
  checkpointing.write_config(str(tmp_path), config.to_json_best_effort())
  rows = evaluate.evaluate_run(config, str(tmp_path), scales=[32, 64])
  assert len(rows) == 4 * 3
  assert all(r["images"] == 20 for r in rows)
  # A random net: chance level, but every protocol ran through every photo.
  assert all(r["top1_error"] >= 0.5 for r in rows)
