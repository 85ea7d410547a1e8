"""The training loop end to end: real data, checkpoints, exact resume, bad input.

Runs `train.train_and_evaluate` (and `main.run`, training then the final evaluation and
report) on tiny nets over eight fake CPU devices.
"""

import gzip
import itertools
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from configs import default
from vgg_jax import checkpointing
from vgg_jax import evaluate
from vgg_jax import input_pipeline
from vgg_jax import main
from vgg_jax import models
from vgg_jax import parallel
from vgg_jax import pixel_stats
from vgg_jax import train
from vgg_jax import xla_flags

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
  config = default.get_config()
  config.update(dict(
      model="A", width=1 / 16, fc_width=32, init="he", dropout_rate=0.5,
      channels=1, crop_size=32, train_scale_min=32, train_scale_max=36, eval_scale=32,
      color_shift_std=0.0, mean_rgb="compute", normalize_std=True, shuffle_buffer=256,
      batch_size=16, learning_rate=0.02, num_epochs=1, log_every_steps=2,
      checkpoint_every_steps=3, keep_checkpoints=2))
  config.update(overrides)
  return config


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def write_fashion_mnist_folder(root, per_split):
  """train/ and val/ folders of the first real Fashion-MNIST images, as PNG files."""
  for split, prefix, offset in (("train", "train", 0), ("val", "t10k", 0)):
    with gzip.open(f"{FASHION_MNIST}/{prefix}-images-idx3-ubyte.gz") as f:
      images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(f"{FASHION_MNIST}/{prefix}-labels-idx1-ubyte.gz") as f:
      labels = np.frombuffer(f.read(), np.uint8, offset=8)
    for i in range(offset, offset + per_split[split]):
      directory = os.path.join(root, split, f"class_{labels[i]}")
      os.makedirs(directory, exist_ok=True)
      Image.fromarray(images[i]).save(os.path.join(directory, f"{i}.png"))


@pytest.fixture(scope="module")
def fashion_folder(tmp_path_factory):
  if not os.path.isdir(FASHION_MNIST):
    pytest.skip("Debian's dataset-fashion-mnist is not installed (apt-get install -y "
                "dataset-fashion-mnist)")
  root = str(tmp_path_factory.mktemp("fashion"))
  write_fashion_mnist_folder(root, {"train": 640, "val": 100})
  return root


def test_tiny_run_on_real_images_end_to_end(fashion_folder, tmp_path):
  config = tiny_config(dataset=f"folder:{fashion_folder}", eval_split="val",
                       width=1 / 8, fc_width=64, batch_size=32,
                       log_every_steps=5, checkpoint_every_steps=10, dropout_rate=0.0,
                       learning_rate=0.02, num_epochs=3, final_eval_protocols="dense")
  result = main.run(config, str(tmp_path))
  records = read_jsonl(tmp_path / "metrics.jsonl")
  losses = [r["train_loss"] for r in records if "train_loss" in r]
  assert np.mean(losses[-2:]) < 0.8 * np.mean(losses[:2]), losses
  waits = [r["train_data_wait_fraction"] for r in records if "train_loss" in r]
  assert len(waits) == len(losses) and all(0 <= w <= 1 for w in waits)
  assert result["examples"] == 100 and result["step"] == 60
  assert result["top1_error"] < 0.6  # 10 classes: chance is 0.9
  evals = [r for r in records if "eval_top1_error" in r]
  assert [r["step"] for r in evals] == [20, 40, 60]
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["50", "60"]
  assert len(os.listdir(tmp_path / "checkpoints_best")) == 1
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path))
  for name in ("learning_curves.png", "confusion_matrix.png", "final_eval.json",
               "config.json", "eval_table.md", "eval_table.json"):
    assert (tmp_path / name).exists(), name
  params, meta = checkpointing.load_params(str(tmp_path))
  assert meta["model"] == "A" and meta["step"] == 60 and "fc8" in params


def write_random_image_folder(root, per_split, num_classes):
  """root/<split>/class_<k>/*.png of random 28x28 gray images, image i in class
  i % NUM_CLASSES; PER_SPLIT: ((split, count), ...). Returns ROOT."""
  rng = np.random.default_rng(0)
  for split, count in per_split:
    for i in range(count):
      directory = os.path.join(root, split, f"class_{i % num_classes}")
      os.makedirs(directory, exist_ok=True)
      Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(
          os.path.join(directory, f"{i}.png"))
  return root


@pytest.fixture
def mnist(tmp_path):
  """A folder of 72 random 28x28 gray PNGs per split over 10 classes (no mock: the
  checkpoints and the data are real files)."""
  write_random_image_folder(str(tmp_path / "images"), (("train", 72), ("test", 72)), 10)
  return tiny_config(dataset=f"folder:{tmp_path / 'images'}", eval_split="test",
                     channels=1, train_scale_min=32, train_scale_max=32,
                     mean_rgb="imagenet", normalize_std=True)  # (raw pixels diverge)


class Crash(Exception):
  pass


def crash_after(num_batches, monkeypatch):
  """Makes the training data raise after NUM_BATCHES batches: a killed run."""
  real = input_pipeline.train_batches

  def crashing(*args, **kwargs):
    for i, batch in enumerate(real(*args, **kwargs)):
      if i == num_batches:
        raise Crash()
      yield batch
  monkeypatch.setattr(input_pipeline, "train_batches", crashing)


def test_killed_run_resumes_to_the_same_parameters(mnist, tmp_path, monkeypatch):
  # 72 examples / 16 = 4 steps per epoch; evaluation every 2 steps with patience 1 and
  # a high threshold makes the plateau controller drop the rate on the way.
  config = mnist
  config.update(dict(num_epochs=3, eval_every_steps=2, checkpoint_every_steps=3))
  config.plateau.patience = 1
  config.plateau.threshold = 0.5
  config.plateau.max_drops = 3
  config.plateau.stop_after_last = False
  straight = tmp_path / "straight"
  train.train_and_evaluate(config.copy_and_resolve_references(), str(straight))

  interrupted = tmp_path / "interrupted"
  with monkeypatch.context() as patch:
    # Dies after step 7 (batches are read prefetch_to_device ahead of the step); its
    # newest checkpoint is step 6.
    crash_after(7 + config.prefetch_to_device, patch)
    with pytest.raises(Crash):
      train.train_and_evaluate(config.copy_and_resolve_references(), str(interrupted))
  assert checkpointing.Checkpointer(str(interrupted)).latest_step() == 6
  train.train_and_evaluate(config.copy_and_resolve_references(), str(interrupted))

  expected, _ = checkpointing.load(str(straight))
  resumed, meta = checkpointing.load(str(interrupted))
  assert meta["step"] == 12
  jax.tree_util.tree_map(np.testing.assert_array_equal, expected, resumed)

  def rate_trace(workdir):
    records = read_jsonl(workdir / "metrics.jsonl")
    return {r["step"]: r["train_learning_rate"] for r in records
            if "train_learning_rate" in r}
  trace = rate_trace(straight)
  assert len(set(trace.values())) > 1, "the schedule should have dropped"
  assert rate_trace(interrupted) == trace  # resumed steps overwrite with equal values


def test_prefetching_to_the_devices_changes_nothing(mnist, tmp_path):
  """Batches copied to the devices 0 or 3 steps ahead: the same run, bit for bit."""
  mnist.update(dict(num_epochs=1, dropout_rate=0.5))
  params = []
  for ahead in (0, 3):
    config = mnist.copy_and_resolve_references()
    config.prefetch_to_device = ahead
    train.train_and_evaluate(config, str(tmp_path / str(ahead)))
    params.append(checkpointing.load(str(tmp_path / str(ahead)))[0])
  jax.tree_util.tree_map(np.testing.assert_array_equal, *params)


# For the runs that compare speed-only changes: at the tiny nets' usual 0.02 the first
# steps' gradients (norm near 40 on random pixels) magnify float rounding until a ReLU or
# a max-pooling window chooses differently, after which two equally right runs part.
STEADY_LEARNING_RATE = 0.005


def test_resident_eval_batches_change_nothing(mnist, tmp_path, monkeypatch):
  """The eval split kept on the devices between validations, or read again each time:
  the same run, metrics and parameters bit for bit."""
  mnist.update(dict(num_epochs=2, eval_every_steps=2))
  runs = []
  for budget in (train.EVAL_RESIDENT_BYTES, 0):
    monkeypatch.setattr(train, "EVAL_RESIDENT_BYTES", budget)
    workdir = tmp_path / str(budget)
    train.train_and_evaluate(mnist.copy_and_resolve_references(), str(workdir))
    evals = [{k: v for k, v in r.items() if k.startswith("eval_")}
             for r in read_jsonl(workdir / "metrics.jsonl") if "eval_loss" in r]
    runs.append((evals, checkpointing.load(str(workdir))[0]))
  assert len(runs[0][0]) >= 4 and runs[0][0] == runs[1][0]
  jax.tree_util.tree_map(np.testing.assert_array_equal, runs[0][1], runs[1][1])


def test_the_conv_lowerings_train_to_the_same_parameters(mnist, tmp_path):
  """A speed-only change: XLA's convolutions everywhere ("xla") against im2col on the
  2x2 maps of conv5 (what "auto" does on CPU) train the same net to float rounding (the
  matrix product sums each window's terms in another order), over a whole run."""
  params = []
  for lowering in ("xla", "auto"):
    config = mnist.copy_and_resolve_references()
    config.conv_lowering = lowering
    config.learning_rate = STEADY_LEARNING_RATE
    train.train_and_evaluate(config, str(tmp_path / lowering))
    params.append(checkpointing.load(str(tmp_path / lowering))[0])
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), *params)


def test_the_package_xla_flags_train_to_the_same_parameters(mnist):
  """A speed-only change: 9 steps of the real train step (uint8 batches of the input
  pipeline made model input, dropout, momentum SGD), over the eight devices' shares as
  pmap runs them, compiled with the package's XLA flags (`xla_flags.py`: XLA's own
  convolution kernels) and with XLA's defaults (YNNPACK's), reach the same parameters
  to float rounding (the kernels sum a window's terms in another order)."""
  config = mnist
  config.learning_rate = STEADY_LEARNING_RATE
  net = models.from_config(config, 10)
  mean, std = pixel_stats.normalization(config)
  devices = jax.local_device_count()

  def step(state, batch, dropout_key_data, learning_rate):
    return train.train_step(state, input_pipeline.model_inputs(batch, mean=mean, std=std),
                            jax.random.wrap_key_data(dropout_key_data), learning_rate)

  per_device = jax.vmap(step, axis_name=parallel.AXIS)  # as pmap runs it
  replicate = lambda tree: jax.tree_util.tree_map(
      lambda x: jnp.broadcast_to(x, (devices,) + jnp.shape(x)), tree)
  batches = list(itertools.islice(input_pipeline.train_batches(config, seed=0), 9))
  params = []
  for options in (None, xla_flags.XLA_DEFAULTS):
    compiled = jax.jit(per_device, compiler_options=options)
    state = replicate(train.create_train_state(jax.random.key(0), config, net))
    key_data = replicate(jax.random.key_data(jax.random.key(1)))
    learning_rate = replicate(np.float32(config.learning_rate))
    for batch in batches:
      state, _ = compiled(state, batch, key_data, learning_rate)
    params.append(jax.tree_util.tree_map(lambda x: np.asarray(x[0]), state.params))
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), *params)
  changed = jax.tree_util.tree_map(
      lambda a, b: not np.array_equal(a, b), params[0],
      train.create_train_state(jax.random.key(0), config, net).params)
  assert all(jax.tree_util.tree_leaves(changed))  # every layer trained


def test_evaluation_counts_every_example_once(mnist):
  config = mnist
  config.batch_size = 32  # 72 test examples: the last batch is padded
  mapping = parallel.DeviceMapping("pmap")
  model = models.from_config(config, 10)
  state = train.create_train_state(jax.random.key(0), config, model)
  mean, std = pixel_stats.normalization(config)
  _, p_eval = train.map_steps(mapping, model, mean=mean, std=std)
  metrics, confusion = train.validation_metrics(
      p_eval, mapping, mapping.replicate(state.params), input_pipeline.eval_batches(config))
  assert metrics["examples"] == 72 and confusion.sum() == 72
  # The same numbers one example at a time, on the host.
  images, labels = [], []
  for batch in input_pipeline.eval_batches(config):
    keep = batch["mask"].reshape(-1) > 0
    images.append(batch["image"].reshape((-1, 32, 32, 1))[keep])
    labels.append(batch["label"].reshape(-1)[keep])
  images = (np.concatenate(images) - np.float32(mean)) / np.float32(std)
  logits = model.apply({"params": state.params}, images)
  labels = np.concatenate(labels)
  np.testing.assert_allclose(metrics["top1_error"],
                             np.mean(np.argmax(logits, -1) != labels), atol=1e-6)


def test_workdir_of_another_model_is_refused(mnist, tmp_path):
  config = mnist
  train.train_and_evaluate(config.copy_and_resolve_references(), str(tmp_path))
  before = sorted(os.listdir(tmp_path / "checkpoints"))
  config.model = "B"
  with pytest.raises(ValueError, match=r"another architecture \(model: 'A' in the workdir, "
                     r"'B' now\)"):
    train.train_and_evaluate(config, str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == before


def test_a_diverging_run_stops_before_a_nan_is_saved(mnist, tmp_path):
  config = mnist
  config.update(dict(learning_rate=1e6, log_every_steps=1, checkpoint_every_steps=1))
  with pytest.raises(FloatingPointError, match=r"Training diverged at step \d+: NaN or "
                     r"inf in the training loss"):
    train.train_and_evaluate(config, str(tmp_path))
  checkpoints = checkpointing.Checkpointer(str(tmp_path))
  for step in checkpoints._latest.all_steps():  # pylint: disable=protected-access
    state, _ = checkpointing.load(str(tmp_path), step=step)
    assert all(np.isfinite(p).all() for p in jax.tree_util.tree_leaves(state))


def test_the_best_checkpoint_is_the_best_evaluation(mnist, tmp_path, monkeypatch):
  """Gains smaller than the plateau's threshold don't reset its patience, but they do
  make a better checkpoint; a lower accuracy never replaces the best one."""
  accuracies = iter([0.5, 0.5009, 0.5005, 0.4])  # evaluations at steps 2, 4, 6, 8
  real_evaluate = train.validation_metrics

  def scripted(*args):
    metrics, confusion = real_evaluate(*args)
    return dict(metrics, top1_error=1 - next(accuracies)), confusion
  monkeypatch.setattr(train, "validation_metrics", scripted)
  config = mnist
  config.update(dict(num_epochs=2, eval_every_steps=2))
  config.plateau.patience = 10
  train.train_and_evaluate(config, str(tmp_path))
  _, best = checkpointing.load(str(tmp_path), best=True)
  assert best["step"] == 4 and best["eval"]["top1_error"] == pytest.approx(1 - 0.5009)
  _, latest = checkpointing.load(str(tmp_path))
  assert latest["best_accuracy"] == pytest.approx(0.5009)
  mean, std = pixel_stats.normalization(config)  # what evaluation will feed it
  assert latest["normalization"] == dict(mean=list(mean), std=list(std))


def test_saving_a_step_again_keeps_its_checkpoints(tmp_path):
  """A run killed after its best save of a step, but before the step's regular save
  ended, saves that step again when resumed."""
  state, meta = {"w": np.arange(3, dtype=np.float32)}, {"step": 3}
  first = checkpointing.Checkpointer(str(tmp_path))
  first.save(3, state, meta, best=True)
  first.close()
  shutil.rmtree(tmp_path / checkpointing.LATEST / "3")
  again = checkpointing.Checkpointer(str(tmp_path))
  again.save(3, state, meta, best=True)
  again.close()
  for best in (False, True):
    np.testing.assert_array_equal(checkpointing.load(str(tmp_path), best=best)[0]["w"],
                                  state["w"])


def test_a_workdir_resumes_under_another_name_of_its_net(tmp_path):
  config = tiny_config(model="vgg11")
  checkpointing.write_config(str(tmp_path), config.to_json())
  checkpoints = checkpointing.Checkpointer(str(tmp_path))
  checkpoints.save(1, {"w": np.zeros(2, np.float32)}, {"step": 1})
  checkpoints.close()
  assert checkpointing.check_resume(str(tmp_path), tiny_config(model="A")) == []
  with pytest.raises(ValueError, match="model: 'vgg11' in the workdir, 'B' now"):
    checkpointing.check_resume(str(tmp_path), tiny_config(model="B"))


def run_main(*args):
  return subprocess.run([sys.executable, "-m", "vgg_jax.main", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


def test_main_rejects_an_unknown_config_field(tmp_path):
  result = run_main("--config=configs/demo.py", f"--workdir={tmp_path}",
                    "--config.learning_rat=0.1")
  assert result.returncode != 0
  assert "learning_rat" in result.stderr and "Did you mean" in result.stderr
  assert not os.listdir(tmp_path)


def test_main_rejects_a_batch_the_devices_do_not_divide(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  result = subprocess.run(
      [sys.executable, "-m", "vgg_jax.main", "--config=configs/demo.py",
       f"--workdir={tmp_path}", "--config.batch_size=100"],
      cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
  assert result.returncode != 0
  assert "config.batch_size=100 is not divisible by the 8 devices" in result.stderr
  assert not os.listdir(tmp_path)


TINY_CONFIG_FILE = '''
from configs import default

def get_config():
  config = default.get_config()
  config.update(dict(
      model="A", width=1 / 16, fc_width=32, init="he", channels=1, crop_size=32,
      train_scale_min=32, train_scale_max=36, eval_scale=32, color_shift_std=0.0,
      mean_rgb="compute", normalize_std=True, batch_size=16, learning_rate=0.02,
      num_epochs=2, log_every_steps=2, checkpoint_every_steps=100, dropout_rate=0.5,
      dataset="folder:{folder}", eval_split="val"))
  return config
'''


def free_port():
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
  """Multi-host data parallelism: 2 processes x 2 CPU devices (jax.distributed, gloo)
  end with the parameters of 1 process x 4 devices, dropout included: the global mesh
  orders the devices process by process, and each process feeds its slice of every
  global batch, so every device sees the same images and dropout key in both runs.
  Both processes save checkpoints (newest and best) at once, and the paper's dense
  evaluation afterwards splits the images between them. A damaged newest checkpoint is
  moved aside once, and both processes resume from the one before."""
  if not os.path.isdir(FASHION_MNIST):
    pytest.skip("Debian's dataset-fashion-mnist is not installed")
  folder = tmp_path / "images"
  write_fashion_mnist_folder(str(folder), {"train": 64, "val": 20})
  config_file = tmp_path / "tiny.py"
  config_file.write_text(TINY_CONFIG_FILE.format(folder=folder))

  def launch(workdir, devices, *extra):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return subprocess.Popen(
        [sys.executable, "-m", "vgg_jax.main", f"--config={config_file}",
         f"--workdir={workdir}", "--config.final_eval_protocols=dense", *extra],
        cwd=REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

  def launch_two_processes():
    port = free_port()
    return [launch(tmp_path / "two", 2, "--config.distributed=True",
                   f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                   f"--process_id={i}") for i in range(2)]

  def wait_for(launched):
    try:
      for p in launched:
        output, _ = p.communicate(timeout=300)
        assert p.returncode == 0, output[-3000:]
    finally:
      for p in launched:
        p.kill()

  wait_for(launch_two_processes() + [launch(tmp_path / "one", 4)])
  two, meta = checkpointing.load(str(tmp_path / "two"))
  one, _ = checkpointing.load(str(tmp_path / "one"))
  assert meta["step"] == 8
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                                 atol=1e-6), one, two)
  final = json.loads((tmp_path / "two" / "final_eval.json").read_text())
  assert final["examples"] == 20  # every validation image once, over both processes
  tables = [json.loads((tmp_path / run / "eval_table.json").read_text())["rows"]
            for run in ("two", "one")]
  assert [r["images"] for r in tables[0]] == [20] * 4  # Q = 32, 34, 36 and all three
  for two_row, one_row in zip(*tables):  # params equal to float tolerance: an image
    for key in ("top1_error", "top5_error"):  # whose top classes tie may flip, one at most
      assert two_row[key] == pytest.approx(one_row[key], abs=1 / 20 + 1e-9)

  # The newest checkpoint damaged, both processes restarted: process 0 moves it aside,
  # and both resume from the one before to the same parameters, bit for bit.
  os.remove(tmp_path / "two" / "checkpoints" / "8" / "state" / "_METADATA")
  wait_for(launch_two_processes())
  resumed, meta = checkpointing.load(str(tmp_path / "two"))
  assert meta["step"] == 8
  jax.tree_util.tree_map(np.testing.assert_array_equal, two, resumed)
  (moved,) = os.listdir(tmp_path / "two" / "checkpoints_damaged")
  assert moved.startswith("8.")


def test_the_demo_at_reduced_length(tmp_path):
  """README's main job, configs/demo.py, for a tenth of an epoch on the real data."""
  if not os.path.isdir(FASHION_MNIST):
    pytest.skip("Debian's dataset-fashion-mnist is not installed (apt-get install -y "
                "dataset-fashion-mnist)")
  result = run_main("--config=configs/demo.py", f"--workdir={tmp_path / 'run'}",
                    f"--config.data_dir={tmp_path / 'tfds'}", "--config.num_epochs=0.1")
  assert result.returncode == 0, result.stderr[-3000:]
  final = json.loads((tmp_path / "run" / "final_eval.json").read_text())
  assert final["examples"] == 10_000
  assert final["top1_error"] < 0.5  # 47 steps of 128 images: well past chance (0.9)
  records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
  assert max(r["step"] for r in records) == 47
  assert (tmp_path / "run" / "confusion_matrix.png").exists()


OLD_RUN = os.path.join(REPO, "tests", "data", "run_written_before_the_refactor")


def old_run_config(images):
  """The config of OLD_RUN, a run of net A (width 1/32) on `write_random_image_folder`'s
  images, made with the code of before the package's refactor (December 2026) and
  stopped after step 4 of 8 (its checkpoints: step 4, and the best, step 2)."""
  return tiny_config(dataset=f"folder:{images}", eval_split="test", width=1 / 32,
                     fc_width=16, mean_rgb="imagenet", normalize_std=True,
                     train_scale_max=32, eval_every_steps=2, checkpoint_every_steps=3,
                     num_epochs=2)


def test_a_workdir_written_before_the_refactor_resumes_and_evaluates(tmp_path):
  """The workdir layout (config.json, checkpoint items and meta) did not change: an
  old run resumes where it stopped, to the parameters of a run made today in one go,
  and evaluates."""
  images = write_random_image_folder(str(tmp_path / "images"),
                                     (("train", 72), ("test", 72)), 10)
  config = old_run_config(images)
  resumed = str(tmp_path / "resumed")
  shutil.copytree(OLD_RUN, resumed)
  stored = checkpointing.read_config(resumed)  # its data, where this test made it
  checkpointing.write_config(resumed, json.dumps(dict(stored, dataset=config.dataset)))
  result = main.run(config.copy_and_resolve_references(), resumed)
  assert result["step"] == 8
  before = len(read_jsonl(os.path.join(OLD_RUN, "metrics.jsonl")))
  records = read_jsonl(os.path.join(resumed, "metrics.jsonl"))
  assert min(r["step"] for r in records[before:]) > 4  # on from step 4, not from 0
  straight = str(tmp_path / "straight")
  train.train_and_evaluate(config.copy_and_resolve_references(), straight)
  # (Tolerance, not equality: the first 4 steps ran on another CPU, whose float
  # rounding may differ.)
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
      checkpointing.load(straight)[0], checkpointing.load(resumed)[0])
  rows = evaluate.evaluate_run(config, resumed, protocols="center_crop,dense",
                               scales=[32])
  assert [r["images"] for r in rows] == [72, 72]
