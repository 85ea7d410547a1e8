"""What a run guarantees: exact resumes, damaged checkpoints survived, bad data and bad
commands stopped at once with one clear line, and a workdir never left unusable.

Tiny nets on real image files over eight fake CPU devices; the commands as a user runs
them (subprocesses), for their exit status and message.
"""

import glob
import importlib
import os
import shutil
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest

from configs import default
from vgg_jax import checkpointing
from vgg_jax import config_checks
from vgg_jax import datasets
from vgg_jax import input_pipeline
from vgg_jax import pixel_stats
from vgg_jax import train
import test_train  # pylint: disable=g-bad-import-order  (tests/ is on sys.path)

REPO = test_train.REPO


def small_run_config(images, **overrides):
  """Net A on 72 images of 10 classes, batches of 16: 4 steps per epoch, 2 epochs;
  validation (and a checkpoint) every 2 steps, checkpoints every 3, the newest 2 kept."""
  config = test_train.tiny_config(
      dataset=f"folder:{images}", eval_split="test", width=1 / 32, fc_width=16,
      mean_rgb="imagenet", normalize_std=True, train_scale_max=32, eval_every_steps=2,
      checkpoint_every_steps=3, num_epochs=2)
  config.update(overrides)
  return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """An uninterrupted run, and one killed after step 7 (its checkpoints: 4 and 6)."""
  root = tmp_path_factory.mktemp("runs")
  images = test_train.write_random_image_folder(str(root / "images"),
                                                (("train", 72), ("test", 72)), 10)
  config = small_run_config(images)
  train.train_and_evaluate(config.copy_and_resolve_references(), str(root / "straight"))
  with pytest.MonkeyPatch.context() as patch:
    test_train.crash_after(7 + config.prefetch_to_device, patch)
    with pytest.raises(test_train.Crash):
      train.train_and_evaluate(config.copy_and_resolve_references(), str(root / "killed"))
  assert sorted(os.listdir(root / "killed" / "checkpoints")) == ["4", "6"]
  return config, root


def workdir_files(workdir):
  """{relative path: (size, mtime)} of every file under WORKDIR."""
  out = {}
  for directory, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(directory, name)
      out[os.path.relpath(path, workdir)] = (os.path.getsize(path),
                                             os.path.getmtime(path))
  return out


# ------------------------------------------------------------------- exact resume


def test_a_changed_recipe_is_refused_then_taken_when_asked(runs, tmp_path):
  config, root = runs
  workdir = str(tmp_path / "run")
  shutil.copytree(root / "killed", workdir)
  before = workdir_files(workdir)
  changed = config.copy_and_resolve_references()
  changed.update(dict(seed=7, batch_size=8, mean_rgb="compute"))
  with pytest.raises(ValueError, match=r"another recipe \(batch_size: 16 in the workdir, "
                     r"8 now; mean_rgb: 'imagenet' in the workdir, 'compute' now; seed: "
                     r"0 in the workdir, 7 now\).*--accept_config_changes"):
    train.train_and_evaluate(changed, workdir)
  assert workdir_files(workdir) == before  # refused before anything was written
  # Asked for explicitly: it goes on with the new values, and says so in the workdir.
  changed.update(dict(seed=0, mean_rgb="imagenet", log_every_steps=1))
  result = train.train_and_evaluate(changed, workdir, accept_config_changes=True)
  assert result["step"] == 2 * 72 // 8
  (record,) = test_train.read_jsonl(os.path.join(workdir, "config_changes.jsonl"))
  assert record["step"] == 6 and record["changes"] == {
      "batch_size": [16, 8], "log_every_steps": [2, 1]}
  assert checkpointing.read_config(workdir)["batch_size"] == 8


def test_changes_that_keep_the_result_are_taken_and_recorded(runs, tmp_path):
  config, root = runs
  workdir = str(tmp_path / "run")
  shutil.copytree(root / "killed", workdir)
  changed = config.copy_and_resolve_references()
  changed.update(dict(log_every_steps=1, keep_checkpoints=3, checkpoint_every_steps=0))
  train.train_and_evaluate(changed, workdir)
  expected, _ = checkpointing.load(str(root / "straight"))
  resumed, _ = checkpointing.load(workdir)
  jax.tree_util.tree_map(np.testing.assert_array_equal, expected, resumed)
  (record,) = test_train.read_jsonl(os.path.join(workdir, "config_changes.jsonl"))
  assert set(record["changes"]) == {"log_every_steps", "keep_checkpoints",
                                    "checkpoint_every_steps"}


def test_a_failed_start_writes_nothing_and_locks_nothing(runs, tmp_path):
  config, _ = runs
  workdir = tmp_path / "run"
  wrong = config.copy_and_resolve_references()
  wrong.update(dict(num_classes=5, width=1 / 16))  # the data has 10 classes
  with pytest.raises(ValueError, match=r"num_classes=5, but .* has 10 classes: set "
                     r"--config.num_classes=10"):
    train.train_and_evaluate(wrong, str(workdir))
  assert not workdir.exists() or not workdir_files(str(workdir))
  assert checkpointing.check_resume(str(workdir), config) == []  # the right one may go


# ----------------------------------------------------------------- damaged checkpoints


def truncate_a_data_file(step_dir):
  data = [os.path.join(d, f) for d, _, fs in os.walk(step_dir / "state") for f in fs
          if os.sep + "d" + os.sep in os.path.join(d, f)]
  biggest = max(data, key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.truncate(os.path.getsize(biggest) // 2)


DAMAGES = {
    "truncated data file": truncate_a_data_file,
    "meta/metadata deleted": lambda step_dir: os.remove(step_dir / "meta" / "metadata"),
    "state/_METADATA deleted": lambda step_dir: os.remove(step_dir / "state" /
                                                          "_METADATA"),
    "step folder emptied": lambda step_dir: [
        shutil.rmtree(p) if p.is_dir() else p.unlink() for p in step_dir.iterdir()],
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(runs, tmp_path, damage):
  config, root = runs
  workdir = tmp_path / "run"
  shutil.copytree(root / "killed", workdir)
  DAMAGES[damage](workdir / "checkpoints" / "6")
  damaged_files = workdir_files(str(workdir / "checkpoints" / "6"))
  # Evaluation, surgery and conversion read the newest checkpoint that restores.
  _, meta = checkpointing.load(str(workdir))
  assert meta["step"] == 4
  result = train.train_and_evaluate(config.copy_and_resolve_references(), str(workdir))
  assert result["step"] == 8
  expected, _ = checkpointing.load(str(root / "straight"))
  resumed, _ = checkpointing.load(str(workdir))
  jax.tree_util.tree_map(np.testing.assert_array_equal, expected, resumed)
  (moved,) = os.listdir(workdir / "checkpoints_damaged")  # kept, as it was
  assert moved.startswith("6.")
  assert workdir_files(str(workdir / "checkpoints_damaged" / moved)) == damaged_files


KILLED_WRITER = """
import sys
import numpy as np
from vgg_jax import checkpointing
checkpoints = checkpointing.Checkpointer(sys.argv[1], keep=2)
state = {"w": np.zeros((1024, 1024), np.float32)}
print("saving", flush=True)
for step in range(1, 10**6):
  state["w"] += 1
  checkpoints.save(step, state, {"step": step})
"""


@pytest.mark.parametrize("seconds", [2.0, 3.3, 4.7])
def test_a_kill_during_a_checkpoint_write_leaves_a_workdir_that_resumes(tmp_path,
                                                                        seconds):
  """kill -9 while orbax writes and finalises checkpoints (4 MB each, back to back):
  the newest checkpoint that restores is whole."""
  writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path)],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)
  assert writer.stdout.readline().strip() == "saving"
  try:
    writer.wait(timeout=seconds)
  except subprocess.TimeoutExpired:
    writer.kill()  # SIGKILL
  writer.wait()
  checkpoints = checkpointing.Checkpointer(str(tmp_path))
  restored = checkpoints.restore_latest({"w": np.zeros((1024, 1024), np.float32)})
  checkpoints.close()
  assert restored is not None
  state, meta = restored
  assert meta["step"] >= 1 and np.all(state["w"] == meta["step"])


def test_no_checkpoint_that_restores_is_a_clear_error(runs, tmp_path):
  config, root = runs
  workdir = tmp_path / "run"
  shutil.copytree(root / "killed", workdir)
  for step in ("4", "6"):
    os.remove(workdir / "checkpoints" / step / "meta" / "metadata")
  with pytest.raises(ValueError, match=r"No checkpoint in .* restores: step 6: .*; step "
                     r"4: .*damaged, or of another architecture"):
    train.train_and_evaluate(config.copy_and_resolve_references(), str(workdir))


# ------------------------------------------------------------------------ bad data


def write_undecodable_folder(root, per_split=8):
  for split in ("train", "val"):
    for c in ("cat", "dog"):
      os.makedirs(os.path.join(root, split, c))
      for i in range(per_split):
        with open(os.path.join(root, split, c, f"{i}.jpg"), "w") as f:
          f.write("not an image")
  return root


def test_a_folder_of_undecodable_images_fails_at_once_and_leaves_no_trace(tmp_path):
  images = write_undecodable_folder(str(tmp_path / "images"))
  before = workdir_files(images)
  config = small_run_config(images, eval_split="val", mean_rgb="compute")
  signal.signal(signal.SIGALRM, lambda *_: pytest.fail("hung on undecodable images"))
  signal.alarm(120)
  try:
    with pytest.raises(ValueError, match=r"16 of the first 16 images of folder:.* "
                       r"\(split 'train'\) do not decode, e.g. .*\.jpg"):
      train.train_and_evaluate(config, str(tmp_path / "run"))
  finally:
    signal.alarm(0)
  assert workdir_files(images) == before  # no statistics cache in the data
  assert not (tmp_path / "run").exists() or not os.listdir(tmp_path / "run")


def test_a_tfds_dataset_that_needs_a_download_fails_at_once_offline(tmp_path, monkeypatch):
  def no_network(host, *args, **kwargs):
    raise socket.gaierror(socket.EAI_NONAME, f"{host}: Name or service not known")
  monkeypatch.setattr(socket, "getaddrinfo", no_network)
  config = small_run_config("unused", dataset="mnist", data_dir=str(tmp_path / "tfds"))
  signal.signal(signal.SIGALRM, lambda *_: pytest.fail("hung downloading offline"))
  signal.alarm(60)  # TFDS's own retries take minutes per file
  try:
    with pytest.raises(OSError, match=r"(?s)Could not prepare the TFDS dataset 'mnist' .*"
                       r"python -m vgg_jax.datasets --dataset=mnist --data_dir="):
      datasets.dataset_source(config)
  finally:
    signal.alarm(0)


def test_tiny_images_are_legal_but_warned_about(tmp_path, caplog):
  sizes = {"tiny": 1, "small": 28}
  for name, side in sizes.items():
    for split in ("train", "val"):
      for k in range(2):
        os.makedirs(tmp_path / name / split / f"class_{k}")
        Image.fromarray(np.full((side, side), 50 * k, np.uint8)).save(
            tmp_path / name / split / f"class_{k}" / "0.png")
  warned = {}
  for name in sizes:
    caplog.clear()
    config = small_run_config(str(tmp_path / name), eval_split="val", channels=1)
    input_pipeline.check_images(config, "train")  # no error: the images decode
    warned[name] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert not warned["small"]  # 28 pixels, enlarged to S=32
  assert warned["tiny"] == [f"2 of the first 2 images of folder:{tmp_path / 'tiny'} "
                            "(split 'train') have a side of 1 pixels or less, to be "
                            "enlarged to S=32: check config.dataset and the scales."]


def test_fields_set_but_unused_are_listed():
  for path in sorted(glob.glob(os.path.join(REPO, "configs", "[!_]*.py"))):
    name = os.path.splitext(os.path.basename(path))[0]  # shipped configs use all they set
    config = importlib.import_module(f"configs.{name}").get_config()
    assert config_checks.unused_fields(config) == [], name
  config = default.get_config()
  config.update({"dataset": "folder:/images", "data_dir": "/tfds", "nesterov": True,
                 "momentum": 0.0, "channels": 1})
  config.init_from.rule = "net_b"
  assert config_checks.unused_fields(config) == [
      "init_from.rule='net_b' is unused without init_from.checkpoint, and not a rule of "
      "vgg_jax.surgery.RULES either",
      "data_dir='/tfds' is unused with an image folder (config.dataset='folder:/images')",
      "nesterov=True is unused with momentum=0",
      "color_shift_std=0.1 is unused with channels=1 (the colour shift is for RGB)"]


def test_statistics_of_replaced_images_are_computed_again(tmp_path):
  images = test_train.write_random_image_folder(str(tmp_path / "images"),
                                                (("train", 20), ("val", 4)), 2)
  config = small_run_config(images, eval_split="val", mean_rgb="compute", channels=1)
  first = pixel_stats.training_mean(config)
  # The same number of files, other pixels (as when a folder is regenerated).
  for directory, _, files in os.walk(os.path.join(images, "train")):
    for name in files:
      Image.fromarray(np.full((28, 28), 7, np.uint8)).save(os.path.join(directory, name))
  datasets._cached_source.cache_clear()  # pylint: disable=protected-access
  second = pixel_stats.training_mean(config)
  assert second["mean"] == [7.0] and second["std"] == [0.0] and first != second


def test_num_classes_must_be_the_datasets(runs, tmp_path):
  config, _ = runs
  for value, match in ((0, "num_classes must be a positive integer"),
                       (5, "num_classes=5, but .* has 10 classes")):
    wrong = config.copy_and_resolve_references()
    wrong.num_classes = value
    with pytest.raises(ValueError, match=match):
      train.train_and_evaluate(wrong, str(tmp_path / "run"))


# ------------------------------------------------------------------- the commands


def command(module, *args, env=None):
  return subprocess.Popen([sys.executable, "-m", f"vgg_jax.{module}", *args], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=dict(os.environ, **(env or {})))


def test_bad_commands_end_with_one_line_and_touch_nothing(runs, tmp_path):
  """Each command given a bad value, file or flag: exit status 2, one line naming it,
  no traceback, and the workdir it was pointed at unchanged."""
  config, root = runs
  workdir = str(tmp_path / "run")
  shutil.copytree(root / "killed", workdir)
  garbage = tmp_path / "garbage.pth"
  garbage.write_bytes(os.urandom(256))
  (tmp_path / "not_a_dir").write_text("")
  cases = [  # (module, args, what the message must name)
      ("main", ["--config=configs/no_such.py", f"--workdir={workdir}"], "no_such.py"),
      ("main", ["--config=configs/demo.py", "--config.batch_sise=3",
                f"--workdir={workdir}"], "batch_size"),
      ("main", ["--config=configs/demo.py", "--config.batch_size=0",
                f"--workdir={workdir}"], "batch_size must be a positive multiple"),
      ("main", ["--config=configs/demo.py", f"--workdir={workdir}"],
       "another architecture"),
      ("evaluate", [f"--workdir={workdir}", "--scales=abc"], "scales"),
      ("evaluate", [f"--workdir={tmp_path / 'no_run'}"], "No such run directory"),
      ("report", [f"--sweep_dir={tmp_path / 'no_sweep'}"], "no_sweep"),
      ("convert", ["--from=torchvision", f"--input={garbage}",
                   f"--output={tmp_path / 'out'}"], "garbage.pth"),
      ("surgery", [f"--source={tmp_path / 'no_source'}", "--config=configs/vgg16.py",
                   f"--output={tmp_path / 'out'}"], "no_source"),
      ("summary", ["--model=F"], "Unknown VGG configuration 'F'"),
  ]
  before = workdir_files(workdir)
  results = []
  for start in range(0, len(cases), 4):  # a few at a time: the machine may have 2 cores
    running = [command(m, *a) for m, a, _ in cases[start:start + 4]]
    results += [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in running]
  for (module, args, named), (status, out, err) in zip(cases, results):
    lines = [l for l in err.splitlines() if ": error: " in l]
    assert status == 2 and len(lines) == 1 and named in lines[0], (module, args, err)
    assert "Traceback" not in err + out, (module, args, err)
  assert workdir_files(workdir) == before
