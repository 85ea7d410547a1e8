"""Tests of vgg_jax.surgery: the paper's net-A initialisation, the rules, loud errors,
the command, the schedule's configs, and fine-tuning on an image folder.

Nets are width 1/16 with fc_width 16 on 32x32 crops, so every checkpoint is tiny.
"""

import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from configs import default
from configs import finetune_folder
from configs import vgg16_from_a
from configs import vgg16_jittered
from configs import vgg16_s384
from vgg_jax import checkpointing
from vgg_jax import models
from vgg_jax import surgery

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(width=1 / 16, fc_width=16, crop_size=32, num_classes=10, init="paper")


def tiny_config(model="D", **overrides):
  config = default.get_config()
  config.update(dict(TINY, model=model))
  config.update(overrides)
  return config


def train_module():
  try:
    from vgg_jax import train
  except ImportError as e:  # the input pipeline is another module of the project
    pytest.skip(f"vgg_jax.train is not importable: {e}")
  return train


def run_init(config, seed=None):
  """The fresh parameters of a training run: exactly what train.train_and_evaluate
  draws (the seed's initialisation key, create_train_state)."""
  train = train_module()
  init_key, _ = models.seed_keys(config.seed if seed is None else seed)
  return train.create_train_state(init_key, config, models.from_config(config)).params


def shapes(params):
  return {layer: {k: tuple(v.shape) for k, v in p.items()} for layer, p in params.items()}


def abstract(config):
  """Parameter shapes of a config's net (no allocation), as zeros."""
  tree = models.param_shapes(models.from_config(config), models.input_shape(config))
  return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), tree)


@pytest.fixture(scope="module")
def net_a(tmp_path_factory):
  """A 'trained' net A (random weights) saved as a workdir checkpoint."""
  workdir = str(tmp_path_factory.mktemp("vgg11"))
  rng = np.random.default_rng(1)
  params = jax.tree_util.tree_map(
      lambda z: rng.normal(size=z.shape).astype(np.float32), abstract(tiny_config("A")))
  checkpointing.save_params(workdir, params, dict(model="A", num_classes=10), step=7)
  return workdir, params


@pytest.fixture(scope="module")
def d_fresh():
  """The fresh parameters of a tiny net D training run with seed 0 (one compilation
  of the initialisation, shared: it dominates this file's time on a CPU)."""
  return jax.tree_util.tree_map(np.asarray, run_init(tiny_config("D", seed=0)))


def test_net_a_into_d_copies_exactly_the_named_layers(net_a, d_fresh):
  path, a_params = net_a
  config = tiny_config("D", seed=0)
  config.init_from.checkpoint = path
  config.init_from.rule = "net_a"
  fresh = d_fresh
  params, report = surgery.init_params_from(config, fresh)

  copied = ("conv1_1", "conv2_1", "conv3_1", "conv3_2", "fc6", "fc7", "fc8")
  for layer in params:
    expected = a_params[layer] if layer in copied else fresh[layer]
    jax.tree_util.tree_map(np.testing.assert_array_equal, dict(params[layer]),
                           dict(expected))
  assert shapes(params) == shapes(fresh)
  assert [(s, t) for s, t, _ in report.copied] == [(n, n) for n in copied]
  assert [t for t, _ in report.fresh] == [n for n in fresh if n not in copied]
  assert len(report.fresh) == 9  # D's 16 weight layers less A's 7
  assert (report.rule, report.source_model, report.target_model) == ("net_a", "A", "D")
  text = str(report)
  assert "conv3_2" in text and "conv4_3" in text and "(3, 3, 16, 16)" in text
  assert report.to_json()["copied"][0] == dict(
      source="conv1_1", target="conv1_1",
      shapes=dict(kernel=[3, 3, 3, 4], bias=[4]))


def test_net_a_into_e_and_into_c(net_a):
  path, a_params = net_a
  for model in ("C", "E"):
    target = abstract(tiny_config(model))
    params, report = surgery.apply_rule("net_a", a_params, target, source_model="A",
                                        target_model=model)
    np.testing.assert_array_equal(params["conv3_2"]["kernel"],
                                  a_params["conv3_2"]["kernel"])
    assert len(report.copied) == 7 and len(report.fresh) == len(target) - 7


def test_no_checkpoint_leaves_the_fresh_params():
  config = tiny_config("D")
  fresh = abstract(config)
  params, report = surgery.init_params_from(config, fresh)
  assert params is fresh and not report.copied and len(report.fresh) == 16


# ------------------------------------------------------------------------ errors


def test_missing_checkpoint(tmp_path):
  config = tiny_config("D")
  config.init_from.checkpoint = str(tmp_path / "no_such_run")
  with pytest.raises(FileNotFoundError, match="no_such_run.*does not exist"):
    surgery.init_params_from(config, abstract(config))
  os.makedirs(tmp_path / "empty" / "checkpoints")
  config.init_from.checkpoint = str(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="No checkpoint"):
    surgery.init_params_from(config, abstract(config))


def test_wrong_source_architecture(tmp_path):
  source = str(tmp_path / "vgg13")
  checkpointing.save_params(source, abstract(tiny_config("B")),
                            dict(model="B", num_classes=10))
  config = tiny_config("D")
  config.init_from.checkpoint = source
  with pytest.raises(ValueError, match=r"'net_a' needs a source that is net A, but the "
                     r"checkpoint .*vgg13 holds net B"):
    surgery.init_params_from(config, abstract(config))
  config.init_from.rule = "all"
  with pytest.raises(ValueError, match=r"architecture \(D\).*holds net B"):
    surgery.init_params_from(config, abstract(config))
  with pytest.raises(ValueError, match="initialises nets B, C, D, E, not net A"):
    surgery.apply_rule("net_a", abstract(tiny_config("A")), abstract(tiny_config("A")),
                       source_model="A", target_model="A")


def test_shape_mismatch_names_the_layer_and_both_shapes(tmp_path):
  a_wide = abstract(tiny_config("A", width=1 / 8))
  d = abstract(tiny_config("D"))
  with pytest.raises(ValueError) as error:
    surgery.apply_rule("net_a", a_wide, d, source_model="A", target_model="D",
                       source="wide_a")
  message = str(error.value)
  assert "conv1_1: source kernel (3, 3, 3, 8), bias (8,) vs target kernel (3, 3, 3, 4)" \
      ", bias (4,)" in message
  for layer in ("conv2_1", "conv3_1", "conv3_2", "fc6"):
    assert f"\n  {layer}: source" in message  # every offending layer is listed
  assert "fc7" not in message and "fc8" not in message  # fc_width and classes agree


def test_new_number_of_classes_needs_all_but_fc8():
  d10 = abstract(tiny_config("D"))
  d10 = jax.tree_util.tree_map(lambda x: x + 1.0, d10)
  d3 = abstract(tiny_config("D", num_classes=3))
  with pytest.raises(ValueError, match=r"fc8: source kernel \(16, 10\).*vs target kernel "
                     r"\(16, 3\).*rule 'all_but_fc8' leaves fc8 fresh"):
    surgery.apply_rule("all", d10, d3, source_model="D", target_model="D")
  params, report = surgery.apply_rule("all_but_fc8", d10, d3, source_model="vgg16",
                                      target_model="D")
  assert [t for t, _ in report.fresh] == ["fc8"] and len(report.copied) == 15
  np.testing.assert_array_equal(params["fc8"]["kernel"], d3["fc8"]["kernel"])
  np.testing.assert_array_equal(params["fc7"]["kernel"], d10["fc7"]["kernel"])
  params, report = surgery.apply_rule("convs", d10, d3, source_model="D",
                                      target_model="D")
  assert [t for t, _ in report.fresh] == ["fc6", "fc7", "fc8"]


def test_unknown_rule_and_missing_layers(net_a):
  path, a_params = net_a
  config = tiny_config("D")
  config.init_from.checkpoint = path
  config.init_from.rule = "net_b"
  with pytest.raises(ValueError, match=r"Unknown surgery rule 'net_b'; known rules: "
                     r"'net_a'.*'all'.*'all_but_fc8'"):
    surgery.init_params_from(config, abstract(config))
  d = abstract(config)
  with pytest.raises(ValueError, match=r"the source \(net A, .*\) has no conv4_3"):
    surgery.apply_rule({"conv4_3": "conv4_3"}, a_params, d, source_model="A",
                       target_model="D")
  with pytest.raises(ValueError, match=r"the target \(net D\) has no conv9_9"):
    surgery.apply_rule({"conv1_1": "conv9_9"}, a_params, d, source_model="A",
                       target_model="D")
  convs_only = {k: v for k, v in d.items() if k.startswith("conv")}
  with pytest.raises(ValueError, match=r"has no fc6, fc7"):
    surgery.apply_rule("all_but_fc8", convs_only, d, source_model="D", target_model="D")


def test_architecture_from_the_workdirs_config_or_the_layers(tmp_path):
  a = abstract(tiny_config("A"))
  workdir = str(tmp_path / "run")
  checkpointing.save_params(workdir, a, {})  # meta without "model"
  checkpointing.write_config(workdir, '{"model": "vgg11"}')
  assert surgery.read_source(workdir)[2] == "A"
  assert surgery.source_architecture("x", {}, abstract(tiny_config("E"))) == "E"
  assert surgery.source_architecture("x", {}, abstract(tiny_config("B-5x5"))) == "B-5x5"


# ----------------------------------------------------------------------- command


def test_command_writes_the_grafted_checkpoint(net_a, d_fresh, tmp_path):
  """The command's fresh layers are those a training run with the seed draws."""
  path, a_params = net_a
  output = str(tmp_path / "grafted")
  flags = [f"--config.{k}={v}" for k, v in TINY.items()]
  flags.append("--config.seed=5")  # --seed wins
  command = [sys.executable, "-m", "vgg_jax.surgery", f"--source={path}",
             "--config=configs/vgg16.py", "--rule=net_a", f"--output={output}", "--seed=0",
             *flags]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Surgery rule 'net_a': A" in result.stdout and "copied 7 layers" in result.stdout
  params, meta = checkpointing.load_params(output)
  assert (meta["model"], meta["num_classes"], meta["seed"]) == ("D", 10, 0)
  assert meta["surgery"]["rule"] == "net_a"
  assert [c["target"] for c in meta["surgery"]["copied"]] == list(surgery.NET_A_LAYERS)
  for layer in params:
    expected = a_params[layer] if layer in surgery.NET_A_LAYERS else d_fresh[layer]
    jax.tree_util.tree_map(np.testing.assert_array_equal, dict(params[layer]),
                           dict(expected))
  # The output is a net D: a run of D starts from it with rule "all"; net_a refuses it.
  config = tiny_config("D")
  config.init_from.checkpoint = output
  config.init_from.rule = "all"
  restarted, report = surgery.init_params_from(config, abstract(config))
  assert not report.fresh
  np.testing.assert_array_equal(restarted["conv4_3"]["kernel"],
                                params["conv4_3"]["kernel"])
  config.init_from.rule = "net_a"
  with pytest.raises(ValueError, match="needs a source that is net A"):
    surgery.init_params_from(config, abstract(config))
  # The same command again is refused before any work: the output is not overwritten.
  again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120,
                         env=env)
  assert again.returncode != 0
  assert "already holds a checkpoint" in again.stderr, again.stderr[-3000:]
  assert checkpointing.load_params(output)[1]["seed"] == 0


# ----------------------------------------------------------- the paper's schedule


def test_schedule_configs():
  from_a, s384, jittered = (m.get_config() for m in (vgg16_from_a, vgg16_s384,
                                                     vgg16_jittered))
  assert (from_a.model, from_a.init, from_a.init_from.rule) == ("D", "paper", "net_a")
  assert from_a.init_from.checkpoint.endswith("runs/vgg11")
  assert (s384.train_scale_min, s384.train_scale_max, s384.eval_scale,
          s384.learning_rate, s384.init_from.rule) == (384, 384, 384, 1e-3, "all")
  assert (jittered.train_scale_min, jittered.train_scale_max, jittered.eval_scale,
          jittered.learning_rate, jittered.init_from.rule) == (256, 512, 384, 1e-3, "all")
  finetune = finetune_folder.get_config()
  assert finetune.dataset.startswith("folder:")
  assert finetune.init_from.rule == "all_but_fc8" and finetune.num_classes is None
  for module in (vgg16_from_a, vgg16_s384, vgg16_jittered, finetune_folder):
    assert "python -m vgg_jax.main --config=configs/" in module.__doc__
    surgery.resolve_rule(module.get_config().init_from.rule)


def write_folder(root, classes=("cat", "dog"), per_class=(4, 2)):
  rng = np.random.default_rng(0)
  for split, count in zip(("train", "val"), per_class):
    for c, name in enumerate(classes):
      os.makedirs(root / split / name)
      for i in range(count):
        pixels = rng.integers(0, 256, (40, 36, 3), dtype=np.uint8) // (c + 1)
        Image.fromarray(pixels).save(root / split / name / f"{i}.jpg")


def test_finetune_folder_end_to_end(tmp_path):
  """configs/finetune_folder.py on a tiny folder, from a 'pretrained' net with 10
  classes: fc8 is fresh with the folder's 2 classes, the rest copied; a resumed run does
  not apply the surgery again."""
  train = train_module()
  pretrained = str(tmp_path / "pretrained")
  rng = np.random.default_rng(2)
  source = jax.tree_util.tree_map(
      lambda z: rng.normal(size=z.shape).astype(np.float32) / 8, abstract(tiny_config("A")))
  checkpointing.save_params(pretrained, source, dict(model="A", num_classes=10))
  write_folder(tmp_path / "images")

  config = finetune_folder.get_config()
  config.update(dict(model="A", width=1 / 16, fc_width=16, crop_size=32,
                     train_scale_min=32, train_scale_max=36, eval_scale=32,
                     batch_size=8, num_epochs=1, learning_rate=1e-9, weight_decay=0.0,
                     dropout_rate=0.0, mapping="pmap", log_every_steps=1,
                     dataset=f"folder:{tmp_path / 'images'}"))
  config.init_from.checkpoint = pretrained
  workdir = str(tmp_path / "run")
  metrics = train.train_and_evaluate(config, workdir)
  assert metrics["step"] == 1 and metrics["examples"] == 4
  params, meta = checkpointing.load_params(workdir)
  assert meta["num_classes"] == 2 and params["fc8"]["kernel"].shape == (16, 2)
  for layer in ("conv1_1", "conv5_2", "fc6", "fc7"):  # copied (learning rate ~ 0)
    np.testing.assert_allclose(params[layer]["kernel"], source[layer]["kernel"],
                               rtol=1e-5, atol=1e-7)
  # Resuming (a longer run in the same workdir) must not read the source again: with
  # the source gone, re-applying the surgery would fail.
  shutil.rmtree(pretrained)
  config.num_epochs = 2
  metrics = train.train_and_evaluate(config, workdir)
  assert metrics["step"] == 2
