"""Tests of vgg_jax.input_pipeline and vgg_jax.datasets: sources, determinism, robustness.

Transforms run both eagerly and inside tf.data (they can differ); sources are real code
paths on tiny data made here: TFDS under mock_data, imagenet2012 prepared offline from a
tiny manual download, an image folder, and the local Fashion-MNIST builder.
"""

import io
import os
import tarfile
import zipfile

import jax
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import default
from vgg_jax import datasets
from vgg_jax import fashion_mnist
from vgg_jax import input_pipeline as ip
from vgg_jax import input_pipeline_benchmark as benchmark
from vgg_jax import pixel_stats
from vgg_jax import transforms

IMAGENET_WNIDS = ("n01440764", "n01443537", "n01484850", "n01491361", "n01494475")


def small_config(**overrides):
  """The default config with tiny images and batches."""
  config = default.get_config()
  config.update(dict(crop_size=8, train_scale_min=8, train_scale_max=12, eval_scale=10,
                     batch_size=8, shuffle_buffer=64, mean_rgb="imagenet"))
  config.update(overrides)
  return config


def jpeg_bytes(height, width, mode="RGB", seed=0, quality=90):
  rng = np.random.default_rng(seed)
  shape = (height, width) if mode == "L" else (height, width, 3)
  image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
  if mode == "CMYK":
    image = image.convert("CMYK")
  buffer = io.BytesIO()
  image.save(buffer, "JPEG", quality=quality)
  return buffer.getvalue()


def tfdata(fn, *args):
  """FN(*ARGS) computed inside a tf.data map."""
  ds = tf.data.Dataset.from_tensors(tuple(tf.convert_to_tensor(a) for a in args))
  return tf.nest.map_structure(lambda t: t.numpy(), next(iter(ds.map(fn))))


def all_batches(iterator, n):
  return [next(iterator) for _ in range(n)]


def global_batch(batch):
  """[devices, per-device, ...] -> [devices * per-device, ...]."""
  return {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items()}


# ------------------------------------------------------------------------ TFDS source


@pytest.fixture
def mnist(tmp_path):
  """'mnist' under tfds.testing.mock_data: 40 random 28x28x1 examples per split."""
  with tfds.testing.mock_data(num_examples=40):
    yield small_config(dataset="mnist", data_dir=str(tmp_path / "tfds"), eval_split="test",
                       crop_size=16, train_scale_min=16, train_scale_max=24,
                       eval_scale=20)


def test_tfds_by_name(mnist):
  info = datasets.dataset_info(mnist)
  assert info == datasets.DatasetInfo(10, 40, 40, tuple(str(i) for i in range(10)))
  batch = next(ip.train_batches(mnist, seed=0))
  devices = jax.local_device_count()
  assert batch["image"].shape == (devices, 8 // devices, 16, 16, 3)
  assert batch["image"].dtype == np.uint8 and batch["label"].dtype == np.int32
  assert batch["color_shift"].shape == (devices, 8 // devices, 3)
  assert batch["label"].shape == (devices, 8 // devices)
  assert batch["label"].min() >= 0 and batch["label"].max() < 10


def test_eval_batches_cover_every_example_once(mnist):
  batches = list(ip.eval_batches(mnist))
  assert len(batches) == 5          # 40 examples, 8 per batch
  masks = np.concatenate([b["mask"].ravel() for b in batches])
  assert masks.sum() == 40 and masks.shape == (40,)
  mnist.batch_size = 16             # 40 -> 3 batches, the last one half padding
  batches = list(ip.eval_batches(mnist))
  masks = np.concatenate([b["mask"].ravel() for b in batches])
  np.testing.assert_array_equal(masks, [1] * 40 + [0] * 8)
  assert np.all(batches[-1]["image"].reshape(16, -1)[8:] == 0)


def test_gray_dataset_with_one_channel_and_computed_mean(mnist, tmp_path):
  mnist.channels, mnist.mean_rgb, mnist.color_shift_std = 1, "compute", 0.1
  workdir = str(tmp_path / "work")
  os.makedirs(workdir)
  mean, std = pixel_stats.normalization(mnist, workdir=workdir)
  with tfds.testing.mock_data(num_examples=40):
    images = np.stack([x["image"] for x in tfds.builder("mnist").as_dataset(
        split="train").as_numpy_iterator()])
  np.testing.assert_allclose(mean, [images.mean()], rtol=1e-6)
  assert std is None
  assert os.listdir(workdir) == ["vgg_jax_mean_train_1ch.json"]     # the data dir does not exist
  batch = next(ip.eval_batches(mnist))
  assert batch["image"].shape[-1] == 1


def test_imagenet_mean_and_std_constants(mnist):
  mnist.normalize_std = True
  mean, std = pixel_stats.normalization(mnist)
  assert mean == transforms.IMAGENET_MEAN_RGB and std == transforms.IMAGENET_STD_RGB


def test_gray_input_takes_an_rgb_mean_as_its_luma(mnist):
  mnist.channels, mnist.mean_rgb = 1, "123.68,116.78,103.94"
  ip.check_data_fields(mnist)  # accepted
  mean, _ = pixel_stats.normalization(mnist)
  np.testing.assert_allclose(mean, [np.dot(transforms.GRAY_WEIGHTS, (123.68, 116.78, 103.94))])
  mnist.mean_rgb = "1,2"
  with pytest.raises(ValueError, match=r"needs 3 values \(or 1 with channels=1\)"):
    ip.check_data_fields(mnist)


# ----------------------------------------------------------------------- determinism


def test_same_seed_same_batches_other_seed_other_batches(mnist):
  first = all_batches(ip.train_batches(mnist, seed=3), 7)
  again = all_batches(ip.train_batches(mnist, seed=3), 7)
  other = next(ip.train_batches(mnist, seed=4))
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  assert not np.array_equal(first[0]["image"], other["image"])


def test_restart_at_a_step_sees_the_following_batches(mnist):
  uninterrupted = all_batches(ip.train_batches(mnist, seed=1), 12)  # 5 steps per epoch
  for start in (3, 5, 7):
    resumed = all_batches(ip.train_batches(mnist, seed=1, start_step=start), 3)
    for a, b in zip(uninterrupted[start:], resumed):
      np.testing.assert_array_equal(a["image"], b["image"])
      np.testing.assert_array_equal(a["label"], b["label"])


def test_global_batch_does_not_depend_on_the_device_count(mnist, monkeypatch):
  eight = [global_batch(b) for b in all_batches(ip.train_batches(mnist, seed=2), 3)]
  monkeypatch.setattr(jax, "local_device_count", lambda: 1)
  one = all_batches(ip.train_batches(mnist, seed=2), 3)
  assert one[0]["image"].shape[:2] == (1, 8)
  for a, b in zip(eight, one):
    np.testing.assert_array_equal(a["image"], global_batch(b)["image"])


def test_processes_take_their_slices_of_each_global_batch(mnist, monkeypatch):
  monkeypatch.setattr(jax, "local_device_count", lambda: 2)
  whole = [global_batch(b) for b in all_batches(ip.train_batches(mnist, seed=5), 3)]
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  parts = []
  for process in range(2):
    monkeypatch.setattr(jax, "process_index", lambda p=process: p)
    parts.append([global_batch(b) for b in all_batches(ip.train_batches(mnist, seed=5), 3)])
  for k in range(3):
    joined = np.concatenate([parts[0][k]["image"], parts[1][k]["image"]])
    np.testing.assert_array_equal(joined, whole[k]["image"])


def test_an_epoch_sees_every_example_once_then_reshuffles(mnist):
  mnist.update(dict(random_flip=False, color_shift_std=0.0, train_scale_max=16))
  batches = [global_batch(b) for b in all_batches(ip.train_batches(mnist, seed=0), 10)]
  rows = [bytes(row) for b in batches for row in b["image"].reshape(8, -1)]
  epoch_0, epoch_1 = rows[:40], rows[40:]       # 5 steps of 8 per epoch of 40
  assert len(set(epoch_0)) == 40                 # each example once (S = crop: no noise)
  assert set(epoch_0) == set(epoch_1) and epoch_0 != epoch_1


def test_batch_size_must_split_over_devices(mnist):
  mnist.batch_size = jax.local_device_count() + 1
  with pytest.raises(ValueError, match="does not split over"):
    ip.train_batches(mnist, seed=0)


# --------------------------------------------------------------- imagenet2012, offline


def write_imagenet_manual_dir(directory, corrupt_train=False):
  """5 classes x 3 JPEGs in ILSVRC2012_img_train.tar, 10 in ILSVRC2012_img_val.tar."""
  def add(tar, name, data):
    member = tarfile.TarInfo(name)
    member.size = len(data)
    tar.addfile(member, io.BytesIO(data))

  with tarfile.open(os.path.join(directory, "ILSVRC2012_img_train.tar"), "w") as train:
    for c, wnid in enumerate(IMAGENET_WNIDS):
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode="w") as tar:
        for i in range(3):
          data = jpeg_bytes(20 + 3 * i, 24 + 2 * c, seed=10 * c + i)
          if corrupt_train and c == 0 and i == 0:
            data = data[:len(data) // 3]
          add(tar, f"{wnid}_{i}.JPEG", data)
      add(train, f"{wnid}.tar", inner.getvalue())
  with tarfile.open(os.path.join(directory, "ILSVRC2012_img_val.tar"), "w") as val:
    for i in range(10):
      add(val, f"ILSVRC2012_val_{i + 1:08d}.JPEG", jpeg_bytes(18, 22 + i, seed=100 + i))


@pytest.fixture(scope="module", params=["array_record", "tfrecord"])
def imagenet(tmp_path_factory, request):
  """imagenet2012 prepared offline from a tiny manual download with one truncated JPEG:
  as we prepare it (ArrayRecord, read by index), or as TFRecord files (streamed)."""
  root = tmp_path_factory.mktemp("imagenet")
  manual = root / "manual"
  manual.mkdir()
  write_imagenet_manual_dir(manual, corrupt_train=True)
  if request.param == "tfrecord":  # prepared elsewhere, in TFDS's older default format
    tfds.builder("imagenet2012", data_dir=str(root / "tfds"), file_format="tfrecord"
                 ).download_and_prepare(download_config=tfds.download.DownloadConfig(
                     manual_dir=str(manual)))
  config = small_config(dataset="imagenet2012", data_dir=str(root / "tfds"),
                        manual_dir=str(manual), batch_size=8)
  info = datasets.dataset_info(config)            # prepares it
  return config, info


def test_imagenet_prepares_offline_from_a_manual_dir(imagenet):
  config, info = imagenet
  assert (info.num_classes, info.num_train, info.num_eval) == (1000, 15, 10)
  stored = tfds.builder("imagenet2012", data_dir=config.data_dir).info.file_format
  expected = "record" if stored == tfds.core.FileFormat.ARRAY_RECORD else "stream"
  assert datasets.dataset_source(config).split_data("train").kind == expected
  batch = global_batch(next(ip.train_batches(config, seed=0)))
  assert batch["image"].shape == (8, 8, 8, 3)
  assert set(batch["label"]) <= {0, 1, 2, 3, 4}
  masks = np.concatenate([b["mask"].ravel() for b in ip.eval_batches(config)])
  np.testing.assert_array_equal(masks, [1] * 10 + [0] * 6)


def test_imagenet_stream_is_deterministic_and_resumable(imagenet):
  config, _ = imagenet
  first = all_batches(ip.train_batches(config, seed=0), 5)   # 1 step per epoch
  again = all_batches(ip.train_batches(config, seed=0), 5)
  resumed = all_batches(ip.train_batches(config, seed=0, start_step=3), 2)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  for a, b in zip(first[3:], resumed):
    np.testing.assert_array_equal(a["image"], b["image"])
  assert not np.array_equal(first[0]["image"], first[1]["image"])


def test_imagenet_truncated_jpeg_is_skipped_and_counted(imagenet):
  config, _ = imagenet
  batches = ip.train_batches(config, seed=0)
  for _ in range(6):  # 6 epochs of 8 of the 15 images: the truncated one shows up
    next(batches)
  assert batches.num_skipped >= 1
  config.cache = True    # the same in memory, by index
  cached = ip.train_batches(config, seed=0)
  for _ in range(6):
    next(cached)
  assert cached.num_skipped >= 1


def spy_on_record_reads(monkeypatch):
  """[(split, indices read)], one entry per call of the by-index reader."""
  reads, real = [], datasets._record_reader

  def spying(builder, split, image_key, label_key):
    records = real(builder, split, image_key, label_key)

    def spied(indices):
      def note(i):
        reads.append((split, i.tolist()))
        return i
      indices = tf.ensure_shape(tf.numpy_function(note, [indices], tf.int64),
                                indices.shape)
      return records(indices)
    return spied
  monkeypatch.setattr(datasets, "_record_reader", spying)
  datasets._cached_source.cache_clear()
  return reads


def batches_and_skips(batches, n):
  """N global batches and, for each, whether it replaced an undecodable image."""
  out = []
  for _ in range(n):
    before = batches.num_skipped
    out.append((global_batch(next(batches)), batches.num_skipped > before))
  return out


def test_each_process_reads_only_its_examples_by_index(imagenet, monkeypatch):
  """The ArrayRecord path: two processes read disjoint halves of each epoch, and their
  slices of every global batch join into the batches of one process, also resumed.
  (A batch holding the truncated JPEG is left out of the comparison: its slot is
  refilled from the batch's share that the process holds.)"""
  config = imagenet[0].copy_and_resolve_references()
  config.update(dict(batch_size=4, cache=False))      # 3 steps per epoch of 15
  if datasets.dataset_source(config).split_data("train").kind != "record":
    pytest.skip("a TFRecord dataset is streamed")
  monkeypatch.setattr(jax, "local_device_count", lambda: 2)
  reads = spy_on_record_reads(monkeypatch)
  whole = batches_and_skips(ip.train_batches(config, seed=1), 6)
  _, first_epoch = reads[0]
  assert len(first_epoch) == 12 and len(set(first_epoch)) == 12
  resumed = all_batches(ip.train_batches(config, seed=1, start_step=4), 2)
  for (a, _), b in zip(whole[4:], resumed):
    np.testing.assert_array_equal(a["image"], global_batch(b)["image"])

  monkeypatch.setattr(jax, "process_count", lambda: 2)
  parts, epoch_reads = [], []
  for process in range(2):
    monkeypatch.setattr(jax, "process_index", lambda p=process: p)
    reads.clear()
    datasets._cached_source.cache_clear()
    parts.append(batches_and_skips(ip.train_batches(config, seed=1), 6))
    epoch_reads.append(set(reads[0][1]))
  assert all(len(r) == 6 for r in epoch_reads)       # 3 steps x 2 examples each
  assert not epoch_reads[0] & epoch_reads[1]
  assert epoch_reads[0] | epoch_reads[1] == set(first_epoch)
  compared = 0
  for (batch, skipped), (part_0, skipped_0), (part_1, skipped_1) in zip(whole, *parts):
    if skipped or skipped_0 or skipped_1:
      continue
    compared += 1
    for key in ("image", "label", "color_shift"):
      np.testing.assert_array_equal(np.concatenate([part_0[key], part_1[key]]), batch[key])
  assert compared >= 3
  datasets._cached_source.cache_clear()


def test_missing_imagenet_files_name_the_files_and_the_command(tmp_path):
  config = small_config(dataset="imagenet2012", data_dir=str(tmp_path / "tfds"),
                        manual_dir=str(tmp_path / "tars"))
  with pytest.raises(FileNotFoundError) as error:
    datasets.dataset_info(config)
  message = str(error.value)
  for text in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", str(tmp_path / "tars"),
               "python -m vgg_jax.datasets --dataset=imagenet2012 "
               f"--data_dir={tmp_path / 'tfds'} --manual_dir={tmp_path / 'tars'}"):
    assert text in message


# ---------------------------------------------------------------------- image folder


@pytest.fixture
def folder(tmp_path):
  """train/ and val/ of 2 classes; one corrupt, one gray, one CMYK and one tiny JPEG."""
  root = tmp_path / "images"
  for split, count in (("train", 4), ("val", 3)):
    for c, name in enumerate(("cat", "dog")):
      (root / split / name).mkdir(parents=True)
      for i in range(count):
        (root / split / name / f"{i}.jpg").write_bytes(
            jpeg_bytes(14 + i, 18, seed=10 * c + i))
  (root / "train" / "cat" / "gray.jpg").write_bytes(jpeg_bytes(16, 16, "L"))
  (root / "train" / "dog" / "cmyk.jpeg").write_bytes(jpeg_bytes(16, 20, "CMYK"))
  (root / "train" / "dog" / "tiny.JPG").write_bytes(jpeg_bytes(3, 4))
  (root / "train" / "dog" / "notes.txt").write_text("not an image")
  (root / "val" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
  return small_config(dataset=f"folder:{root}")


def test_image_folder(folder):
  info = datasets.dataset_info(folder)
  assert info == datasets.DatasetInfo(2, 11, 7, ("cat", "dog"))
  batches = ip.train_batches(folder, seed=0)
  for _ in range(4):
    batch = global_batch(next(batches))
    assert batch["image"].shape == (8, 8, 8, 3)
  assert batches.num_skipped == 0


def test_corrupt_image_is_skipped_and_counted(folder):
  batches = ip.eval_batches(folder)
  masks = np.concatenate([b["mask"].ravel() for b in batches])
  np.testing.assert_array_equal(masks, [1, 1, 1, 1, 1, 1, 0, 0])  # dog/broken.jpg first
  assert batches.num_skipped == 1
  # In training its slot goes to another image of the same batch.
  folder.eval_split, folder.train_split = "train", "val"
  folder.update(dict(random_flip=False, color_shift_std=0.0, train_scale_max=8))
  train = ip.train_batches(folder, seed=0)
  batch = global_batch(next(train))
  assert train.num_skipped == 1
  rows = {bytes(row) for row in batch["image"].reshape(8, -1)}
  assert len(rows) < 8


def test_dense_eval_buckets_by_shape_and_counts_every_image_once(folder):
  batches = [{k: v[b["valid"]] for k, v in b.items()} for b in
             ip.bucket_by_shape(ip.eval_examples(folder, scale=10), 2).as_numpy_iterator()
             if b["valid"].any()]
  indices = np.concatenate([b["index"] for b in batches])
  assert sorted(indices) == [0, 1, 2, 3, 4, 5]      # 6 good val images, broken one dropped
  shapes = {b["image"].shape[1:] for b in batches}
  assert shapes == {(10, 12, 3), (10, 13, 3), (10, 11, 3)}   # 14x18, 15x18, 16x18
  for b in batches:
    assert len(b["label"]) <= 2


def test_eval_examples_per_process_shards_are_disjoint(folder, monkeypatch):
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "local_device_count", lambda: 2)
  seen, slots = [], 0
  for process in range(2):
    monkeypatch.setattr(jax, "process_index", lambda p=process: p)
    examples = list(ip.eval_examples(folder, scale=10))
    slots += len(examples)
    seen.append([int(x["index"]) for x in examples if x["valid"]])
    masks = [b["mask"] for b in ip.eval_batches(folder)]
    assert len(masks) == 1 and masks[0].sum() == 3         # 4 or 3 examples, 1 broken
  # Every image has a slot; the broken one (the last, val/dog/broken.jpg) is invalid.
  assert slots == 7
  assert sorted(seen[0] + seen[1]) == list(range(6)) and not set(seen[0]) & set(seen[1])


def test_folder_mean_is_computed_and_cached_beside_the_data(folder):
  folder.mean_rgb, folder.train_split = "compute", "val"
  mean, _ = pixel_stats.normalization(folder)
  root = folder.dataset[len("folder:"):]
  pixels = np.concatenate([
      tf.io.decode_jpeg(tf.io.read_file(os.path.join(root, "val", c, f"{i}.jpg")))
      .numpy().reshape(-1, 3) for c in ("cat", "dog") for i in range(3)])  # not broken.jpg
  np.testing.assert_allclose(mean, pixels.mean(0), rtol=1e-9)
  assert os.path.exists(os.path.join(root, "vgg_jax_mean_val_3ch.json"))


# ----------------------------------------------------------------------- bad configs


@pytest.mark.parametrize("overrides,match", [
    (dict(dataset="no_such_dataset_xyz"), "Unknown dataset 'no_such_dataset_xyz'"),
    (dict(dataset="folder:/nonexistent/images"), "does not exist"),
    (dict(train_scale_min=6), "S must be at least the crop size"),
    (dict(eval_scale=4), "Q must be at least the crop size"),
    (dict(channels=2), "use 3 \\(RGB\\) or 1"),
    (dict(mean_rgb="cifar"), "use 'imagenet', 'compute' or numbers"),
])
def test_bad_config_errors_name_the_problem(overrides, match):
  config = small_config(**overrides)
  with pytest.raises((ValueError, FileNotFoundError), match=match):
    ip.check_data_fields(config)
    datasets.dataset_info(config)


# ------------------------------------------------------------- Fashion-MNIST, local


@pytest.mark.skipif(not fashion_mnist.has_files(fashion_mnist.DEBIAN_DIR),
                    reason="needs Debian's dataset-fashion-mnist "
                           f"({fashion_mnist.INSTALL_COMMAND})")
def test_local_fashion_mnist_builder(tmp_path):
  data_dir = str(tmp_path / "tfds")
  builder = tfds.builder("fashion_mnist_local", data_dir=data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      max_examples_per_split=64))
  assert builder.info.features["label"].names[0] == "T-shirt/top"
  images, labels = fashion_mnist.load_split(fashion_mnist.DEBIAN_DIR, "test")
  assert images.shape == (10_000, 28, 28, 1) and set(labels) == set(range(10))
  first = next(builder.as_dataset(split="test", shuffle_files=False).as_numpy_iterator())
  np.testing.assert_array_equal(first["image"], images[0])
  assert first["label"] == labels[0]

  config = small_config(dataset="fashion_mnist_local", data_dir=data_dir,
                        eval_split="test", crop_size=32, train_scale_min=32,
                        train_scale_max=40, eval_scale=32, batch_size=16)
  assert datasets.dataset_info(config).num_train == 64
  for channels in (3, 1):
    config.channels = channels
    batch = next(ip.train_batches(config, seed=0))
    assert batch["image"].shape[2:] == (32, 32, channels)


# ------------------------------------------------------------------------- benchmark


def test_benchmark_reads_a_wheel_and_times_the_real_pipeline(tmp_path):
  wheel = tmp_path / "foolbox-3.3.4-py3-none-any.whl"
  with zipfile.ZipFile(wheel, "w") as z:
    for i in range(2):
      z.writestr(f"foolbox/data/imagenet_0{i}_1.jpg", jpeg_bytes(40, 40, seed=i))
    z.writestr("foolbox/data/mnist_00_7.png", b"not read")
  photos = benchmark.read_photos(str(wheel))
  assert len(photos) == 2
  jpegs = benchmark.reencode(photos, 10)
  shapes = [Image.open(io.BytesIO(j)).size for j in jpegs[:4]]
  assert shapes == list(benchmark.IMAGENET_SIZES)
  sizes = dict(scale_min=64, scale_max=80, crop_size=56)
  image, shift = benchmark.pil_transform(io.BytesIO(jpegs[0]), np.random.default_rng(0),
                                         **sizes)
  assert image.shape == (56, 56, 3) and image.dtype == np.uint8 and shift.shape == (3,)
  rates = benchmark.run(jpegs, str(tmp_path / "work"), sources=["folder", "array_record"],
                        batch_size=8, **sizes)
  assert set(rates) == {"train_batches (folder)", "train_batches (array_record)",
                        "PIL + numpy", "decode_jpeg alone"}
  assert all(len(r) == 1 and r[0] > 0 for r in rates.values())
  # The ArrayRecord copy is the real ImageNet path: read by index.
  config = benchmark.pipeline_config("imagenet2012", data_dir=str(tmp_path / "work/tfds"))
  assert datasets.dataset_source(config).split_data("train").kind == "record"
