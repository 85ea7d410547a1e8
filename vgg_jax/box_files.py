"""Bounding-box annotations on disk: our CSV form, checked, and ILSVRC's XML converted.

Our form, a CSV per split, `<dir>/<split>.csv`:

  image,class,xmin,ymin,xmax,ymax
  images/train/0.png,Sneaker,12,30,47.5,52
  ...

one row per box (an image with several boxes has several rows, all of one class). The
image path is relative to <dir> (or absolute); coordinates are continuous pixel edges
(a box covering a whole W x H image is 0,0,W,H). The classes, in label order, are the
lines of `<dir>/classes.txt` if it exists, else the sorted class names of
`<dir>/train.csv`. `read_split` checks the file and every image it names before any
training starts.

ILSVRC's boxes come as PASCAL-VOC-style XML, one file per image; convert them with

  python -m vgg_jax.box_files --xml_dir=<bbox folder> --image_dir=<image folder> \\
      --output=<dir>/train.csv
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import os
from typing import Sequence
import xml.etree.ElementTree as ElementTree

from absl import logging
import numpy as np
from PIL import Image

from vgg_jax import cli

MAX_BOXES = 16  # boxes kept per image
HEADER = ("image", "class", "xmin", "ymin", "xmax", "ymax")
TOLERANCE = 1.0  # pixels a box may stick out of its image (then clipped to it)
SHOWN = 3  # example lines an error message names


@dataclasses.dataclass(frozen=True, eq=False)
class BoxSplit:
  """One split's images and their boxes: an example per image, in CSV order."""
  paths: list[str]  # absolute
  labels: np.ndarray  # int32 [N]
  boxes: np.ndarray  # float32 [N, MAX_BOXES, 4], zeros after the real ones
  counts: np.ndarray  # int32 [N], real boxes per image
  class_names: tuple[str, ...]

  def __len__(self) -> int:
    return len(self.paths)


def class_names_of(directory: str) -> tuple[str, ...]:
  """The classes of the box files in DIRECTORY, in label order: the lines of
  classes.txt, else the sorted class names of train.csv."""
  listed = os.path.join(directory, "classes.txt")
  if os.path.exists(listed):
    with open(listed) as f:
      return tuple(line.strip() for line in f if line.strip())
  rows, _ = _read_rows(os.path.join(directory, "train.csv"))
  return tuple(sorted({row["class"] for _, row in rows}))


def split_file(directory: str, split: str) -> str:
  """The box file of SPLIT: `<DIRECTORY>/<SPLIT>.csv`."""
  return os.path.join(directory, f"{split}.csv")


def read_split(directory: str, split: str,
               class_names: Sequence[str] | None = None) -> BoxSplit:
  """`<DIRECTORY>/<SPLIT>.csv` as a checked BoxSplit.

  Raises ValueError naming the file, the bad lines and the fix, for: a missing file or
  header, non-numeric coordinates, xmax <= xmin or ymax <= ymin, an unknown class (not
  in CLASS_NAMES, by default `class_names_of(DIRECTORY)`), one image with rows of
  different classes, a missing image, a box outside its image by more than a pixel
  (boxes within that are clipped to the image).
  """
  path = split_file(directory, split)
  rows, problems = _read_rows(path)
  names = tuple(class_names) if class_names is not None else class_names_of(directory)
  images, more = _group(directory, rows, {n: i for i, n in enumerate(names)}, problems)
  _check_images(images, problems)
  if problems:
    raise ValueError(f"{path} has bad rows:\n" + "\n".join(
        _describe(what, lines, fix) for (what, fix), lines in problems.items()))
  if more:
    logging.warning("%s: %d images have more than %d boxes; the first %d of each are "
                    "kept.", path, more, MAX_BOXES, MAX_BOXES)
  return _as_split(images, names)


def _describe(what: str, lines: list[int], fix: str) -> str:
  shown = ", ".join(map(str, lines[:SHOWN]))
  rest = f" and {len(lines) - SHOWN} more" if len(lines) > SHOWN else ""
  return f"  {what} on line{'s' * (len(lines) > 1)} {shown}{rest} ({len(lines)} in " \
         f"all): {fix}"


def _read_rows(path: str) -> tuple[list[tuple[int, dict]], dict]:
  """(line number, row) of every row of the CSV at PATH, and an empty problem table."""
  if not os.path.exists(path):
    raise ValueError(f"{path}: no such box file. Write it with the header "
                     f"{','.join(HEADER)} and one row per box, or convert ILSVRC's XML "
                     "with `python -m vgg_jax.box_files`.")
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    missing = [c for c in HEADER if c not in (reader.fieldnames or ())]
    if missing:
      raise ValueError(f"{path}: the header lacks {', '.join(missing)}. Its first line "
                       f"must be {','.join(HEADER)}.")
    return [(reader.line_num, row) for row in reader], {}


def _group(directory, rows, index, problems):
  """{absolute image path: [label, [box, ...], [line, ...]]} from ROWS, recording bad
  rows in PROBLEMS; and how many images had more than MAX_BOXES boxes."""
  def bad(what, fix, line):
    problems.setdefault((what, fix), []).append(line)

  images = {}
  for line, row in rows:
    try:
      box = [float(row[c]) for c in HEADER[2:]]
    except (TypeError, ValueError):
      bad("non-numeric coordinates", "xmin, ymin, xmax, ymax must be numbers.", line)
      continue
    if not (box[2] > box[0] and box[3] > box[1]):
      bad("empty boxes (xmax <= xmin or ymax <= ymin)", "give each box's left and top "
          "edges first, then its right and bottom edges, in pixels.", line)
    label = index.get(row["class"])
    if label is None:
      bad("unknown classes", "use a class listed in classes.txt (or, without it, one "
          "that appears in train.csv), or add it there.", line)
    image = os.path.abspath(os.path.join(directory, row["image"] or ""))
    entry = images.setdefault(image, [label, [], []])
    if entry[0] is None:
      entry[0] = label
    elif label is not None and label != entry[0]:
      bad("an image with boxes of different classes", "give all boxes of an image one "
          "class (the image's label).", line)
    entry[1].append(box)
    entry[2].append(line)
  more = sum(len(boxes) > MAX_BOXES for _, boxes, _ in images.values())
  return images, more


def _check_images(images: dict, problems: dict) -> None:
  """Records in PROBLEMS missing images and boxes outside their image; clips the boxes
  of IMAGES within the tolerance to the image."""
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    sizes = dict(zip(images, pool.map(_image_size, images)))
  for image, (_, boxes, lines) in images.items():
    if sizes[image] is None:
      problems.setdefault(("missing or unreadable images", "check the path (relative to "
                           "the CSV's folder) and that the file is an image."),
                          []).append(lines[0])
      continue
    width, height = sizes[image]
    for k, (box, line) in enumerate(zip(boxes, lines)):
      if (min(box[0], box[1]) < -TOLERANCE or box[2] > width + TOLERANCE or
          box[3] > height + TOLERANCE):
        problems.setdefault(("boxes outside their image", "coordinates are pixel edges "
                             "within 0..width and 0..height of the image."),
                            []).append(line)
      boxes[k] = [min(max(box[0], 0), width), min(max(box[1], 0), height),
                  min(max(box[2], 0), width), min(max(box[3], 0), height)]


def _image_size(path: str) -> tuple[int, int] | None:
  """(width, height) of the image at PATH from its header, or None when unreadable."""
  try:
    with Image.open(path) as image:
      return image.size
  except (OSError, ValueError):
    return None


def _as_split(images: dict, names: tuple[str, ...]) -> BoxSplit:
  boxes = np.zeros((len(images), MAX_BOXES, 4), np.float32)
  counts = np.zeros(len(images), np.int32)
  for i, (_, image_boxes, _) in enumerate(images.values()):
    kept = image_boxes[:MAX_BOXES]
    boxes[i, :len(kept)] = kept
    counts[i] = len(kept)
  labels = np.array([label for label, _, _ in images.values()], np.int32)
  return BoxSplit(paths=list(images), labels=labels, boxes=boxes, counts=counts,
                  class_names=names)


# ------------------------------------------------------------------ ILSVRC's XML


def ilsvrc_to_csv(xml_dir: str, image_dir: str, output_csv: str) -> dict[str, int]:
  """Converts ILSVRC's bounding-box XML files under XML_DIR into our CSV OUTPUT_CSV.

  Train XMLs live in class folders (<wnid>/<wnid>_<n>.xml), validation XMLs flat.
  Each XML's image is looked for as IMAGE_DIR/<wnid>/<name>.JPEG, then
  IMAGE_DIR/<name>.JPEG; XMLs without an image are skipped. The image's class is its
  folder's wnid (else its first object's); objects of other classes are dropped. ILSVRC
  numbers pixels from 1, corners included: (xmin, ymin, xmax, ymax) becomes the edges
  (xmin - 1, ymin - 1, xmax, ymax), clipped to the image. Paths are written relative to
  OUTPUT_CSV's folder. Returns counts: xml, images, boxes, skipped (no image), and
  dropped (images that lost objects of another class).
  """
  out_dir = os.path.dirname(os.path.abspath(output_csv))
  counts = dict(xml=0, images=0, boxes=0, skipped=0, dropped=0)
  rows = []
  for xml_path in _xml_files(xml_dir):
    counts["xml"] += 1
    folder = os.path.basename(os.path.dirname(xml_path))
    wnid = folder if os.path.normpath(os.path.dirname(xml_path)) != \
        os.path.normpath(xml_dir) else None
    names, objects, size = _parse_xml(xml_path)
    image = _find_image(image_dir, names, [wnid] + [o[0] for o in objects[:1]])
    if image is None or not objects:
      counts["skipped"] += 1
      continue
    label = wnid or objects[0][0]
    kept = [box for name, box in objects if name == label]
    counts["dropped"] += len(kept) < len(objects)
    counts["images"] += 1
    counts["boxes"] += len(kept)
    relative = os.path.relpath(image, out_dir)
    rows += [[relative, label] + [f"{v:g}" for v in _edges(box, size)] for box in kept]
  os.makedirs(out_dir, exist_ok=True)
  with open(output_csv, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(HEADER)
    writer.writerows(rows)
  return counts


def _xml_files(xml_dir: str) -> list[str]:
  if not os.path.isdir(xml_dir):
    raise ValueError(f"--xml_dir {xml_dir} is not a folder: give the folder of "
                     "ILSVRC's bounding-box XML files.")
  return sorted(os.path.join(root, name) for root, _, files in os.walk(xml_dir)
                for name in files if name.endswith(".xml"))


def _parse_xml(path: str):
  """([image name candidates], [(wnid, [xmin, ymin, xmax, ymax]), ...],
  (width, height) or None) of one ILSVRC XML file."""
  try:
    root = ElementTree.parse(path).getroot()
  except ElementTree.ParseError as e:
    raise ValueError(f"{path} is not valid XML ({e}).") from e
  stem = os.path.splitext(os.path.basename(path))[0]
  filename = os.path.splitext((root.findtext("filename") or "").strip())[0]
  width, height = root.findtext("size/width"), root.findtext("size/height")
  size = (float(width), float(height)) if width and height else None
  objects = []
  for obj in root.iter("object"):
    box = [obj.findtext(f"bndbox/{c}") for c in HEADER[2:]]
    if obj.findtext("name") and all(box):
      objects.append((obj.findtext("name").strip(), [float(v) for v in box]))
  # Some train XMLs carry a placeholder filename: the XML's own name comes first.
  return list(dict.fromkeys([stem, filename] if filename else [stem])), objects, size


def _find_image(image_dir: str, names: list[str], wnids: list[str | None]) -> str | None:
  for name in names:
    for wnid in dict.fromkeys(w for w in wnids if w):
      for ext in (".JPEG", ".jpg", ".jpeg"):
        if os.path.exists(path := os.path.join(image_dir, wnid, name + ext)):
          return path
    for ext in (".JPEG", ".jpg", ".jpeg"):
      if os.path.exists(path := os.path.join(image_dir, name + ext)):
        return path
  return None


def _edges(box: list[float], size) -> list[float]:
  """ILSVRC's 1-based inclusive pixel corners as pixel edges, clipped to SIZE."""
  x0, y0, x1, y1 = box[0] - 1, box[1] - 1, box[2], box[3]
  if size is not None:
    x0, x1 = (min(max(v, 0), size[0]) for v in (x0, x1))
    y0, y1 = (min(max(v, 0), size[1]) for v in (y0, y1))
  return [x0, y0, x1, y1]


# --------------------------------------------------------------------------- command


def main(argv: Sequence[str]) -> None:
  """Converts ILSVRC's bounding-box XML files into our CSV and prints a summary."""
  del argv
  counts = ilsvrc_to_csv(FLAGS.xml_dir, FLAGS.image_dir, FLAGS.output)
  print(f"{FLAGS.output}: {counts['boxes']} boxes of {counts['images']} images from "
        f"{counts['xml']} XML files; {counts['skipped']} skipped (no image found under "
        f"{FLAGS.image_dir}, or no object); {counts['dropped']} images lost objects of "
        "another class.")


if __name__ == "__main__":
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("xml_dir", None, "Folder of ILSVRC's bounding-box XML files.")
  flags.DEFINE_string("image_dir", None, "Folder of the images (per-class folders or "
                      "flat).")
  flags.DEFINE_string("output", None, "The CSV to write, e.g. <dir>/train.csv.")
  flags.mark_flags_as_required(["xml_dir", "image_dir", "output"])
  FLAGS = flags.FLAGS
  cli.run(main)
