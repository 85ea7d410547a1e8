"""Boxes for localisation: forms, IoU, crop frames, greedy merging, the error measures,
the Euclidean loss and per-class boxes (vgg_jax.boxes); box files and their checks
(vgg_jax.box_files); the demo's dataset (experiments/localization_data.py)."""

import csv
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from vgg_jax import box_files
from vgg_jax import boxes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------ forms and IoU


def test_center_size_round_trip():
  xyxy = np.random.default_rng(0).uniform(0, 50, (3, 2, 4))
  xyxy[..., 2:] += xyxy[..., :2]
  cs = boxes.to_center_size(xyxy)
  np.testing.assert_allclose(cs[0, 0], [(xyxy[0, 0, 0] + xyxy[0, 0, 2]) / 2,
                                        (xyxy[0, 0, 1] + xyxy[0, 0, 3]) / 2,
                                        xyxy[0, 0, 2] - xyxy[0, 0, 0],
                                        xyxy[0, 0, 3] - xyxy[0, 0, 1]])
  np.testing.assert_allclose(boxes.from_center_size(cs), xyxy)
  assert isinstance(boxes.to_center_size(jnp.asarray(xyxy)), jax.Array)


def test_iou_by_hand():
  a = np.array([[0, 0, 4, 4], [0, 0, 4, 4], [0, 0, 2, 1], [0, 0, 4, 4], [1, 1, 1, 5],
                [0, 0, 0, 0]], float)
  b = np.array([[0, 0, 4, 4], [5, 5, 9, 9], [1, 0, 3, 1], [0, 0, 4, 2], [1, 1, 1, 5],
                [0, 0, 0, 0]], float)
  expected = [1.0, 0.0, 1 / 3, 0.5, 0.0, 0.0]  # identical, disjoint, ..., empty boxes
  np.testing.assert_allclose(boxes.iou(a, b), expected)
  np.testing.assert_allclose(jax.jit(boxes.iou)(a, b), expected, rtol=1e-6)
  assert boxes.iou(a[:, None], b[None]).shape == (6, 6)
  np.testing.assert_allclose(boxes.pairwise_iou(a[:4], b[:2]),
                             [[1, 0], [1, 0], [1 / 8, 0], [1, 0]])
  assert not np.isnan(jax.grad(lambda x: boxes.iou(x, x).sum())(jnp.zeros(4))).any()


# ----------------------------------------------------------------- crop frames


def test_crop_frame_by_hand_with_flip_and_clip():
  frame = dict(factor=(0.5, 0.25), offset=(10, 5), crop_size=20, flipped=True)
  box = np.array([40.0, 30, 120, 90])
  # x: 40/4 - 5 = 5, 120/4 - 5 = 25 -> clipped 20; y: 15 - 10 = 5, 45 - 10 = 35 -> 20;
  # mirrored in a side of 20: x 5..20 -> 0..15.
  np.testing.assert_allclose(boxes.to_crop_frame(box, **frame), [0, 5, 15, 20])
  unclipped = boxes.to_crop_frame(box, **frame, clip=False)
  np.testing.assert_allclose(unclipped, [-5, 5, 15, 35])
  np.testing.assert_allclose(boxes.from_crop_frame(unclipped, **frame), box)


def test_crop_frame_round_trip():
  rng = np.random.default_rng(1)
  many = rng.uniform(0, 300, (7, 4))
  for flipped in (False, True):
    frame = dict(factor=(1.3, 0.7), offset=(12, 33), crop_size=224, flipped=flipped)
    there = boxes.to_crop_frame(many, **frame, clip=False)
    np.testing.assert_allclose(boxes.from_crop_frame(there, **frame), many)


def test_crop_frame_follows_the_pixels():
  """A painted box, rescaled (exact integer factors), cropped and mirrored as pixels,
  ends where to_crop_frame says."""
  image = np.zeros((30, 40), bool)
  image[7:20, 5:15] = True  # the box (5, 7, 15, 20) in pixel edges
  rescaled = np.repeat(np.repeat(image, 2, axis=0), 3, axis=1)  # factor (2, 3)
  for flipped in (False, True):
    crop = rescaled[4:4 + 32, 6:6 + 32]
    crop = crop[:, ::-1] if flipped else crop
    rows, cols = np.flatnonzero(crop.any(1)), np.flatnonzero(crop.any(0))
    seen = [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]
    np.testing.assert_allclose(boxes.to_crop_frame(
        np.array([5.0, 7, 15, 20]), factor=(2, 3), offset=(4, 6), crop_size=32,
        flipped=flipped), seen)


# ---------------------------------------------------------------- greedy merging


def test_greedy_merge_by_hand():
  given = np.array([[0, 0, 10, 10], [0, 0, 10, 12], [0, 1, 10, 11],  # a cluster
                    [50, 50, 70, 70], [52, 50, 72, 70],  # another
                    [0, 30, 5, 35]], float)  # alone
  scores = np.array([0.5, 0.3, 0.3, 0.5, 0.5, 0.9])
  merged, merged_scores, support = boxes.greedy_merge(given, scores)
  # The mean of the three originals (merging pairwise means would give y 0.5, not 1/3).
  np.testing.assert_allclose(merged, [[0, 1 / 3, 10, 11], [51, 50, 71, 70],
                                      [0, 30, 5, 35]])
  np.testing.assert_allclose(merged_scores, [1.1, 1.0, 0.9])
  np.testing.assert_array_equal(support, [3, 2, 1])
  untouched = boxes.greedy_merge(given, scores, threshold=0.9)
  assert len(untouched[0]) == 6 and untouched[2].tolist() == [1] * 6
  assert [len(x) for x in boxes.greedy_merge(np.zeros((0, 4)), np.zeros(0))] == [0] * 3


def test_greedy_merge_is_fast_at_2000_boxes():
  rng = np.random.default_rng(2)
  centres = rng.uniform(0, 200, (20, 2))[rng.integers(0, 20, 2000)]
  given = boxes.from_center_size(np.concatenate(
      [centres + rng.normal(0, 6, (2000, 2)), rng.uniform(40, 80, (2000, 2))], axis=1))
  start = time.perf_counter()
  merged, merged_scores, support = boxes.greedy_merge(given, rng.uniform(size=2000))
  assert time.perf_counter() - start < 10  # (about 0.5 s on one core)
  assert support.sum() == 2000 and len(merged) < 200
  assert np.all(np.diff(merged_scores) <= 0)


# ---------------------------------------------------------------- error measures


def test_localization_errors_by_hand():
  gt = np.zeros((6, 3, 4))
  gt[:, 0] = [10, 10, 50, 50]
  gt[4, 1] = [60, 60, 90, 90]  # image 4's second box
  gt[5, 1] = [60, 60, 90, 90]  # image 5's padding: not a box (count 1)
  count = np.array([1, 1, 1, 1, 2, 1])
  labels = np.array([1, 2, 3, 0, 5, 6])
  good, bad, second = [10, 10, 50, 50], [10, 10, 20, 20], [61, 61, 90, 90]
  classes = np.array([[1, 7, 7, 7, 7], [2, 7, 7, 7, 7], [4, 7, 7, 7, 7],
                      [7, 7, 7, 0, 7], [5, 7, 7, 7, 7], [6, 7, 7, 7, 7]])
  guesses = np.array([good, bad, good, good, second, second], float)[:, None].repeat(5, 1)
  # right class and box; right class, bad box; wrong class; top-5 hit in guess 3;
  # the second of two boxes; a box matching padding only.
  errors = boxes.localization_errors(classes, guesses, labels, gt, count)
  assert errors == pytest.approx({"top1_loc_error": 4 / 6, "top5_loc_error": 3 / 6})
  one = boxes.localization_errors(classes[:, :1], guesses[:, :1], labels, gt, count)
  assert one["top1_loc_error"] == one["top5_loc_error"] == pytest.approx(4 / 6)
  expected = [True, False, True, True, True, False]
  assert boxes.box_correct(guesses[:, 0], gt, count).tolist() == expected
  jitted = jax.jit(boxes.box_correct)(jnp.asarray(guesses[:, 0]), jnp.asarray(gt),
                                      jnp.asarray(count))
  assert np.asarray(jitted).tolist() == expected


# -------------------------------------------------------------- regression head


def test_euclidean_loss_by_hand():
  pred = jnp.array([[1.0, 2, 3, 4], [1, 1, 1, 1]])
  target = jnp.zeros((2, 4))
  assert float(boxes.euclidean_loss(pred, target, jnp.array([1.0, 0]))) == 15.0
  assert float(boxes.euclidean_loss(pred, target, jnp.array([1.0, 1]))) == 8.5
  weighted = boxes.euclidean_loss(pred, target, jnp.array([2.0, 1]))
  assert float(weighted) == pytest.approx((2 * 30 + 4) / (2 * 3))
  assert float(boxes.euclidean_loss(pred, target)) == 8.5
  zero = jnp.zeros(2)
  assert float(boxes.euclidean_loss(pred, target, zero)) == 0.0
  grads = jax.grad(boxes.euclidean_loss, argnums=(0, 2))(pred, target, zero)
  assert all(bool(jnp.isfinite(g).all()) for g in grads)
  grad = jax.grad(boxes.euclidean_loss)(pred, target, jnp.array([1.0, 0]))
  np.testing.assert_allclose(grad, [[1, 2, 3, 4], [0, 0, 0, 0]])


def test_class_boxes_picks_the_labels_box():
  outputs = np.arange(2 * 12, dtype=np.float32).reshape(2, 12)  # 3 classes
  labels = np.array([2, 0])
  np.testing.assert_array_equal(boxes.class_boxes(outputs, labels),
                                [outputs[0, 8:12], outputs[1, 0:4]])
  jitted = jax.jit(boxes.class_boxes)(jnp.asarray(outputs), jnp.asarray(labels))
  np.testing.assert_array_equal(jitted, [outputs[0, 8:12], outputs[1, 0:4]])
  single = outputs[:, :4]
  assert boxes.class_boxes(single, labels) is single
  dense = np.arange(2 * 3 * 5 * 12, dtype=np.float32).reshape(2, 3, 5, 12)
  picked = boxes.class_boxes(jnp.asarray(dense), jnp.asarray(labels))
  assert picked.shape == (2, 3, 5, 4)
  np.testing.assert_array_equal(picked[0], dense[0, ..., 8:12])
  np.testing.assert_array_equal(picked[1], dense[1, ..., 0:4])
  np.testing.assert_array_equal(boxes.class_boxes(dense[..., :4], labels), dense[..., :4])


# -------------------------------------------------------------------- box files


def write_png(path, width, height):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new("RGB", (width, height), (90, 120, 30)).save(path)


def write_csv(path, rows):
  with open(path, "w", newline="") as f:
    csv.writer(f).writerows([box_files.HEADER] + rows)


@pytest.fixture
def box_dir(tmp_path):
  write_png(str(tmp_path / "images" / "a.png"), 40, 30)
  write_png(str(tmp_path / "images" / "b.png"), 20, 20)
  write_csv(tmp_path / "train.csv", [
      ["images/a.png", "dog", 1, 2, 30, 25],
      ["images/b.png", "cat", 0, 0, 20.5, 20],  # half a pixel out: clipped
      ["images/a.png", "dog", 5, 5, 40, 30]])
  return tmp_path


def test_read_split(box_dir):
  split = box_files.read_split(str(box_dir), "train")
  assert split.class_names == ("cat", "dog") == box_files.class_names_of(str(box_dir))
  assert split.paths == [str(box_dir / "images" / "a.png"),
                         str(box_dir / "images" / "b.png")]
  assert split.labels.tolist() == [1, 0] and split.labels.dtype == np.int32
  assert split.counts.tolist() == [2, 1] and len(split) == 2
  assert split.boxes.shape == (2, box_files.MAX_BOXES, 4)
  assert split.boxes.dtype == np.float32
  np.testing.assert_array_equal(split.boxes[0, :2], [[1, 2, 30, 25], [5, 5, 40, 30]])
  np.testing.assert_array_equal(split.boxes[1, 0], [0, 0, 20, 20])
  assert not split.boxes[0, 2:].any()
  (box_dir / "classes.txt").write_text("bird\ndog\ncat\n")
  assert box_files.read_split(str(box_dir), "train").labels.tolist() == [1, 2]


def test_read_split_keeps_the_first_boxes(box_dir):
  write_csv(box_dir / "val.csv", [["images/a.png", "dog", k, 0, k + 1, 1]
                                  for k in range(box_files.MAX_BOXES + 3)])
  split = box_files.read_split(str(box_dir), "val")
  assert split.counts.tolist() == [box_files.MAX_BOXES]
  assert split.boxes[0, -1, 0] == box_files.MAX_BOXES - 1


@pytest.mark.parametrize("row, message", [
    (["images/missing.png", "dog", 1, 1, 5, 5], "missing or unreadable images on line 3"),
    (["images/a.png", "dog", 1, 1, 42, 5], "boxes outside their image on line 3"),
    (["images/a.png", "dog", 5, 1, 5, 5], r"empty boxes \(xmax <= xmin"),
    (["images/a.png", "dog", 1, 9, 5, 8], "empty boxes"),
    (["images/a.png", "bird", 1, 1, 5, 5], "unknown classes on line 3"),
    (["images/a.png", "cat", 1, 1, 5, 5], "different classes on line 3"),
    (["images/a.png", "dog", "one", 1, 5, 5], "non-numeric coordinates"),
])
def test_read_split_names_bad_rows(box_dir, row, message):
  write_csv(box_dir / "val.csv", [["images/a.png", "dog", 1, 1, 5, 5], row])
  with pytest.raises(ValueError, match=message) as raised:
    box_files.read_split(str(box_dir), "val")
  assert "val.csv" in str(raised.value)


def test_read_split_counts_bad_lines_and_missing_files(box_dir):
  write_csv(box_dir / "val.csv", [["images/a.png", "dog", 9, 1, 5, 5]] * 5)
  with pytest.raises(ValueError, match=r"lines 2, 3, 4 and 2 more \(5 in all\)"):
    box_files.read_split(str(box_dir), "val")
  with pytest.raises(ValueError, match="no such box file"):
    box_files.read_split(str(box_dir), "test")
  (box_dir / "val.csv").write_text("path,label\nimages/a.png,dog\n")
  with pytest.raises(ValueError, match="header lacks image, class, xmin"):
    box_files.read_split(str(box_dir), "val")


ILSVRC_XML = """<annotation>
  <folder>{folder}</folder><filename>{filename}</filename>
  <size><width>{width}</width><height>{height}</height><depth>3</depth></size>
  {objects}
</annotation>"""
ILSVRC_OBJECT = """<object><name>{}</name><pose>Unspecified</pose><truncated>0</truncated>
  <difficult>0</difficult><bndbox><xmin>{}</xmin><ymin>{}</ymin><xmax>{}</xmax>
  <ymax>{}</ymax></bndbox></object>"""


def write_xml(path, filename, width, height, objects):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(ILSVRC_XML.format(folder="x", filename=filename, width=width, height=height,
                              objects="".join(ILSVRC_OBJECT.format(*o) for o in objects)))


def test_ilsvrc_to_csv(tmp_path):
  wnid, other = "n01440764", "n01443537"
  train_stem, val_stem = f"{wnid}_10026", "ILSVRC2012_val_00000001"
  # Train: in a class folder, with the placeholder filename some files carry.
  write_xml(str(tmp_path / "bbox" / "train" / wnid / f"{train_stem}.xml"), "%s", 32, 24,
            [(wnid, 1, 1, 32, 24), (other, 3, 3, 9, 9)])
  write_xml(str(tmp_path / "bbox" / "val" / f"{val_stem}.xml"), val_stem, 20, 16,
            [(wnid, 2, 3, 10, 12), (wnid, 11, 1, 20, 16)])
  write_xml(str(tmp_path / "bbox" / "val" / "ILSVRC2012_val_00000002.xml"),
            "ILSVRC2012_val_00000002", 20, 16, [(wnid, 2, 3, 10, 12)])  # no image
  for path, size in [(tmp_path / "img" / "train" / wnid / f"{train_stem}.JPEG", (32, 24)),
                     (tmp_path / "img" / "val" / f"{val_stem}.JPEG", (20, 16))]:
    os.makedirs(path.parent, exist_ok=True)
    Image.new("RGB", size, (200, 10, 10)).save(str(path), "JPEG")
  out = tmp_path / "boxes"
  counts = box_files.ilsvrc_to_csv(str(tmp_path / "bbox" / "train"),
                                   str(tmp_path / "img" / "train"),
                                   str(out / "train.csv"))
  assert counts == dict(xml=1, images=1, boxes=1, skipped=0, dropped=1)
  counts = box_files.ilsvrc_to_csv(str(tmp_path / "bbox" / "val"),
                                   str(tmp_path / "img" / "val"), str(out / "val.csv"))
  assert counts == dict(xml=2, images=1, boxes=2, skipped=1, dropped=0)
  train = box_files.read_split(str(out), "train")
  assert train.class_names == (wnid,)
  assert train.paths == [str(tmp_path / "img" / "train" / wnid / f"{train_stem}.JPEG")]
  np.testing.assert_array_equal(train.boxes[0, 0], [0, 0, 32, 24])  # the whole image
  val = box_files.read_split(str(out), "val")
  assert val.counts.tolist() == [2] and val.labels.tolist() == [0]
  np.testing.assert_array_equal(val.boxes[0, :2], [[1, 2, 10, 12], [10, 0, 20, 16]])
  with open(out / "val.csv") as f:
    assert next(csv.reader(f)) == list(box_files.HEADER)
    assert next(csv.reader(f))[0] == os.path.join("..", "img", "val", f"{val_stem}.JPEG")


def test_ilsvrc_command(tmp_path):
  command = [sys.executable, "-m", "vgg_jax.box_files", f"--xml_dir={tmp_path}/none",
             f"--image_dir={tmp_path}", f"--output={tmp_path}/train.csv"]
  done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
  assert done.returncode == 2, done.stderr
  assert "is not a folder" in done.stderr and "Traceback" not in done.stderr


# ------------------------------------------------------------------ the demo's data


def test_localization_data(tmp_path):
  from experiments import localization_data  # pylint: disable=g-import-not-at-top
  from vgg_jax import fashion_mnist  # pylint: disable=g-import-not-at-top
  if not fashion_mnist.has_files(fashion_mnist.DEBIAN_DIR):
    pytest.skip("Debian's dataset-fashion-mnist is not installed "
                f"({fashion_mnist.INSTALL_COMMAND})")
  localization_data.write(str(tmp_path / "a"), 8, 4, seed=3)
  names = localization_data.class_names()
  for split, count in [("train", 8), ("val", 4)]:
    data = box_files.read_split(str(tmp_path / "a"), split)
    assert len(data) == count and data.class_names == tuple(names)
    assert data.labels.tolist() == [i % 10 for i in range(count)]
    assert data.counts.tolist() == [1] * count
    for path, box in zip(data.paths, data.boxes[:, 0]):
      width, height = Image.open(path).size
      assert 64 <= width <= 96 and 64 <= height <= 80
      assert 0 <= box[0] < box[2] <= width and 0 <= box[1] < box[3] <= height
      assert box[2] - box[0] >= 4 and box[3] - box[1] >= 4
  localization_data.write(str(tmp_path / "b"), 8, 4, seed=3)
  for name in ("train.csv", "val.csv", "classes.txt", "images/val/3.png"):
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
