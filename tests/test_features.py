"""Tests of vgg_jax.features and vgg_jax.linear_probe: the paper's transfer features
(appendix B) and the linear SVMs on them.

Tiny nets (width 1/16, fc_width 32, 32-pixel crops) over eight fake CPU devices, on
small folders of gray images of two shapes; a converted torchvision-layout net on a
real photo; scikit-learn's SVMs on small separable sets.
"""

import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest

from vgg_jax import checkpointing
from vgg_jax import convert
from vgg_jax import features
from vgg_jax import input_pipeline
from vgg_jax import linear_probe
from vgg_jax import models
import test_convert  # pylint: disable=g-bad-import-order  (tests/ is on sys.path)
import test_train  # pylint: disable=g-bad-import-order

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NORMALIZATION = dict(mean=[100.0], std=[50.0])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """Three classes of random gray images, 28x28 and 28x40, in train/ and val/."""
  root = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  for split, n in (("train", 12), ("val", 9)):
    for i in range(n):
      directory = root / split / f"class_{i % 3}"
      directory.mkdir(parents=True, exist_ok=True)
      height, width = ((28, 28), (28, 40))[i % 2]
      Image.fromarray(rng.integers(0, 256, (height, width), np.uint8)).save(
          directory / f"{i:02d}.png")
  return str(root)


def tiny_config(folder, **overrides):
  return test_train.tiny_config(dataset=f"folder:{folder}", eval_split="val",
                                batch_size=8, mean_rgb="imagenet", **overrides)


@functools.lru_cache(maxsize=None)
def tiny_net(seed=0):
  model = models.create_model("A", num_classes=3, width=1 / 16, fc_width=32, init="he")
  return model, models.init_params(model, jax.random.key(seed), (32, 32, 1))


@pytest.fixture(scope="module")
def checkpoint(folder, tmp_path_factory):
  """A random tiny net A saved as a checkpoint with its config.json (a 'run')."""
  path = str(tmp_path_factory.mktemp("net"))
  checkpointing.save_params(path, tiny_net()[1], dict(
      model="A", num_classes=3, width=1 / 16, fc_width=32, crop_size=32, channels=1,
      normalization=NORMALIZATION))
  checkpointing.write_config(path, tiny_config(folder).to_json())
  return path


def images(shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# --------------------------------------------------------------- the descriptor


def test_pooled_dense_fc7_at_the_crop_size_is_the_centre_crops_fc7():
  model, params = tiny_net()
  x = images((3, 32, 32, 1))
  apply = jax.jit(functools.partial(model.apply, train=False),
                  static_argnames=("until",))
  for layer in models.FEATURE_LAYERS:
    dense = jax.jit(functools.partial(features.dense_descriptors, model, layer=layer,
                                      flip=False))(params, x)
    crop = apply({"params": params}, x, until=layer)
    assert crop.shape == (3, 32)
    np.testing.assert_allclose(dense, crop, rtol=1e-5, atol=1e-6)
  logits = apply({"params": params}, x)
  fc7 = apply({"params": params}, x, until="fc7")
  np.testing.assert_allclose(logits, fc7 @ params["fc8"]["kernel"] + params["fc8"]["bias"],
                             rtol=1e-4, atol=1e-5)  # fc7 after its ReLU feeds fc8


def test_pooling_and_flip_against_numpy():
  model, params = tiny_net()
  x = images((2, 64, 96, 1), seed=1)
  describe = jax.jit(functools.partial(features.dense_descriptors, model))
  dense_map = jax.jit(functools.partial(model.apply, train=False, dense=True,
                                        until="fc7"))
  maps = np.asarray(dense_map({"params": params}, x))
  flipped = np.asarray(dense_map({"params": params}, x[:, :, ::-1]))
  assert maps.shape == (2, 2, 3, 32) and (maps >= 0).all()  # a map, after the ReLU
  expected = (maps.mean(axis=(1, 2)) + flipped.mean(axis=(1, 2))) / 2
  np.testing.assert_allclose(describe(params, x), expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(describe(params, x[:, :, ::-1]), expected, rtol=1e-5,
                             atol=1e-6)  # flip-averaged: the same for the mirror image
  one_way = jax.jit(functools.partial(features.dense_descriptors, model, flip=False))
  np.testing.assert_allclose(one_way(params, x), maps.mean(axis=(1, 2)), rtol=1e-5,
                             atol=1e-6)


def test_scales_averaged_or_stacked_then_l2_normalised_against_numpy():
  rng = np.random.default_rng(2)
  a, b, c = (rng.random((4, 5)).astype(np.float32) for _ in range(3))

  def unit(v):
    return v / np.sqrt((v ** 2).sum(-1, keepdims=True))
  np.testing.assert_allclose(features.combine([[a, b]], "average"), unit((a + b) / 2),
                             rtol=1e-6)
  stacked = features.combine([[a, b]], "stack")
  np.testing.assert_allclose(stacked, unit(np.concatenate([a, b], 1)), rtol=1e-6)
  assert stacked.shape == (4, 10)
  two_nets = features.combine([[a, b], [c]], "average")
  np.testing.assert_allclose(two_nets, np.concatenate([unit(a + b), unit(c)], 1)
                             / np.sqrt(2), rtol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(two_nets, axis=1), 1, rtol=1e-6)
  np.testing.assert_array_equal(features.l2_normalize(np.zeros((1, 3))), 0)
  assert features.appendix_b_scales(224) == (256, 384, 512, 640, 768)
  assert features.appendix_b_scales(32) == (37, 55, 73, 91, 110)


def test_a_split_end_to_end_equals_the_numpy_reference(folder, checkpoint, tmp_path):
  config = tiny_config(folder)
  path = features.extract(config, [checkpoint], str(tmp_path), scales=[32, 48],
                          aggregation="stack")
  values, labels, valid, settings = features.read_features(path)
  assert values.shape == (9, 64) and valid.all()
  assert (settings["layer"], settings["scales"], settings["class_names"]) == (
      "fc7", [32, 48], ["class_0", "class_1", "class_2"])
  model, params = tiny_net()
  describe = jax.jit(functools.partial(features.dense_descriptors, model))
  per_scale = []
  for q in (32, 48):
    out = np.zeros((9, 32), np.float32)
    for e in input_pipeline.eval_examples(config, scale=q, mean_std=(
        NORMALIZATION["mean"], NORMALIZATION["std"])).as_numpy_iterator():
      out[e["index"]] = describe(params, e["image"][None])[0]
      assert labels[e["index"]] == e["label"]
    per_scale.append(out)
  stacked = np.concatenate(per_scale, 1)
  expected = stacked / np.linalg.norm(stacked, axis=1, keepdims=True)
  np.testing.assert_allclose(values, expected, rtol=1e-4, atol=1e-6)
  mtime = os.path.getmtime(path)  # the same settings again: read, not computed
  assert features.extract(config, [checkpoint], str(tmp_path), scales=[32, 48],
                          aggregation="stack") == path
  assert os.path.getmtime(path) == mtime
  other = features.extract(config, [checkpoint], str(tmp_path), scales=[32, 48])
  assert other != path and features.read_features(other)[0].shape == (9, 32)


def test_converted_torchvision_net_gives_torchs_penultimate_activations(tmp_path):
  net = test_convert.torchvision_vgg("A")
  import torch  # pylint: disable=g-import-not-at-top
  pytest.importorskip("safetensors", reason="safetensors is not installed.")
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  save_file({k: v.contiguous() for k, v in net.state_dict().items()},
            str(tmp_path / "vgg.safetensors"))
  convert.convert_file("torchvision", "A", str(tmp_path / "vgg.safetensors"),
                       str(tmp_path / "converted"))
  photos = test_convert.real_images(n=2)   # real photos, 64x64 = the crop size
  for split in ("train", "val"):
    directory = tmp_path / "photos" / split / "photo"
    directory.mkdir(parents=True)
    for i, photo in enumerate(photos):
      Image.fromarray(photo.astype(np.uint8)).save(directory / f"{i}.png")
  x = torch.from_numpy(photos.astype(np.uint8).astype(np.float32)).permute(0, 3, 1, 2)
  x = (x / 255 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
      [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
  with torch.no_grad():  # the classifier without its last Linear: fc7 after its ReLU
    penultimate = net.classifier[:-1](torch.flatten(net.avgpool(net.features(x)), 1))
  penultimate = penultimate.numpy()
  size = test_convert.SIZE
  config = test_train.tiny_config(dataset=f"folder:{tmp_path / 'photos'}",
                                  eval_split="val", channels=3, batch_size=8,
                                  crop_size=size, train_scale_min=size,
                                  train_scale_max=size, eval_scale=size)
  path = features.extract(config, [str(tmp_path / "converted")], str(tmp_path / "out"),
                          scales=[size], flip=False)
  ours = features.read_features(path)[0]
  expected = penultimate / np.linalg.norm(penultimate, axis=1, keepdims=True)
  np.testing.assert_allclose(ours, expected, rtol=1e-3, atol=1e-4)


# --------------------------------------------------------------- bad input


def test_bad_input_fails_before_any_image_is_read(folder, checkpoint, tmp_path,
                                                  monkeypatch):
  def no_images(*args, **kwargs):
    raise AssertionError("an image was read")
  monkeypatch.setattr(input_pipeline, "eval_examples", no_images)
  config = tiny_config(folder)
  extract = functools.partial(features.extract, config, output_dir=str(tmp_path))
  with pytest.raises(ValueError, match=r"Unknown feature layer 'fc8': choose one of "
                     r"fc6, fc7"):
    extract([checkpoint], layer="fc8")
  with pytest.raises(ValueError, match=r"Q=\[24\] are smaller than the crop size 32"):
    extract([checkpoint], scales=[24, 32])
  with pytest.raises(ValueError, match="Unknown aggregation 'max'"):
    extract([checkpoint], aggregation="max")
  with pytest.raises(ValueError, match="No such checkpoint: .*nowhere"):
    extract([str(tmp_path / "nowhere")])
  convs = {k: v for k, v in tiny_net()[1].items() if k not in models.HEAD}
  checkpointing.save_params(str(tmp_path / "notop"), convs,
                            dict(model="A", width=1 / 16, channels=1, head=False))
  with pytest.raises(ValueError, match=r"has no fc7 .*conv-only weights"):
    extract([str(tmp_path / "notop")])
  assert not [f for f in os.listdir(tmp_path) if f.endswith(".npz")]


# --------------------------------------------------------------- linear SVMs


def test_linear_svms_separate_a_separable_set():
  rng = np.random.default_rng(0)
  centres = np.eye(4, 6) * 10
  y = np.repeat(np.arange(4), 20)
  x = centres[y] + rng.standard_normal((80, 6))
  result = linear_probe.probe(x[::2], y[::2], x[1::2], y[1::2])
  assert result["accuracy"] == result["mean_class_recall"] == result["map"] == 1.0
  assert result["per_class_recall"] == [1.0] * 4 and result["c"] in linear_probe.C_GRID
  two = linear_probe.probe(x[y < 2][::2], y[y < 2][::2], x[y < 2][1::2], y[y < 2][1::2])
  assert two["accuracy"] == 1.0 and len(two["per_class_ap"]) == 2
  multi = (x[:, :3] > 5).astype(int)    # multi-label: which of 3 centres is near
  multi_result = linear_probe.probe(x[::2], multi[::2], x[1::2], multi[1::2])
  assert multi_result["map"] == 1.0 and "accuracy" not in multi_result
  with pytest.raises(ValueError, match="at least two training images"):
    linear_probe.fit(x[:5], np.array([0, 0, 0, 0, 1]))
  with pytest.raises(ValueError, match=r"Test labels \[7\] never occur"):
    linear_probe.probe(x, y, x[:2], np.array([0, 7]))


def test_probe_files_writes_a_table_and_refuses_mismatched_features(tmp_path):
  rng = np.random.default_rng(1)
  settings = dict(layer="fc7", scales=[32], aggregation="average", flip=True,
                  checkpoints=["/runs/demo"], class_names=["a", "b"])
  for split, n in (("train", 20), ("test", 10)):
    y = np.arange(n) % 2
    x = np.eye(2, 3)[y] * 5 + rng.standard_normal((n, 3))
    valid = np.ones(n, bool)
    valid[0] = False    # an undecodable image: left out
    features._write(str(tmp_path / f"{split}.npz"), x.astype(np.float32), y, valid,
                    dict(settings, split=split))
  row = linear_probe.probe_files(str(tmp_path / "train.npz"), str(tmp_path / "test.npz"))
  assert (row["train_images"], row["test_images"], row["accuracy"]) == (19, 9, 1.0)
  table = (tmp_path / "probe_table.md").read_text()
  assert "| demo fc7 Q=32 average flip | 3 | 19 | 9 |" in table
  assert json.loads((tmp_path / "probe_table.json").read_text())["rows"][0]["map"] == 1.0
  features._write(str(tmp_path / "other.npz"), x.astype(np.float32), y, valid,
                  dict(settings, split="test", layer="fc6"))
  with pytest.raises(ValueError, match=r"different nets or settings \(layer differ"):
    linear_probe.probe_files(str(tmp_path / "train.npz"), str(tmp_path / "other.npz"))


# --------------------------------------------------------------- the commands


def run_command(module, *args):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO,
                        capture_output=True, text=True, timeout=180,
                        env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""))


def test_commands_end_to_end(checkpoint, tmp_path):
  out = str(tmp_path / "features")
  result = run_command("vgg_jax.features", f"--checkpoints={checkpoint}",
                       f"--output_dir={out}", "--scales=32,40", "--split=val")
  assert result.returncode == 0, result.stderr[-3000:]
  test_path = result.stdout.strip().splitlines()[-1]
  assert os.path.exists(test_path) and "val_fc7_" in test_path
  config = checkpointing.frozen_config(checkpointing.read_config(checkpoint))
  train_path = features.extract(config, [checkpoint], out, scales=[32, 40],
                                split="train")
  result = run_command("vgg_jax.linear_probe", f"--train={train_path}",
                       f"--test={test_path}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "| mAP (%) |" in result.stdout and os.path.exists(
      os.path.join(out, "probe_table.md"))
  result = run_command("vgg_jax.features", f"--checkpoints={checkpoint}", "--layer=fc9")
  assert result.returncode == 2
  # One line, no traceback (before it, TensorFlow may log its oneDNN notice on CPUs
  # with AVX-512, whatever TF_CPP_MIN_LOG_LEVEL says).
  assert "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      "features: error: Unknown feature layer 'fc9': choose one of fc6, fc7 (the "
      "head's hidden layers; the paper's features are fc7's).")
