"""Tests of vgg_jax.summary: Table 2's parameter counts and the multiply-adds, from the
layer specification alone, checked against the Flax modules' own parameter trees."""

import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from vgg_jax import models
from vgg_jax import summary

# (parameters, multiply-adds) of one 224x224 image with 1000 classes.
EXPECTED = {
    "A": (132_863_336, 7_609_090_048),
    "A-LRN": (132_863_336, 7_609_090_048),
    "B": (133_047_848, 11_308_466_176),
    "C": (133_638_952, 11_770_888_192),
    "D": (138_357_544, 15_470_264_320),
    "E": (143_667_240, 19_632_062_464),
    "B-5x5": (134_503_528, 9_356_017_664),
}


def eval_shape_count(name, size, channels=3, **knobs):
  model = models.create_model(name, **knobs)
  images = jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)
  variables = jax.eval_shape(functools.partial(model.init, train=False),
                             jax.random.key(0), images)
  return models.count_params(variables["params"])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_totals_match_paper(name):
  params, macs = EXPECTED[name]
  t = summary.totals(name)
  assert (t.params, t.macs) == (params, macs)
  assert summary.count_params_from_spec(name) == params
  assert summary.count_macs(name) == macs


def test_aliases_give_same_table():
  assert summary.layer_table("vgg16") == summary.layer_table("D")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_params_match_flax_modules_off_the_paper_size(name):
  knobs = dict(width=0.25, num_classes=10, fc_width=64, filter_size=None)
  rows = summary.layer_table(name, image_size=64, channels=1, **knobs)
  assert sum(r.params for r in rows) == eval_shape_count(name, 64, channels=1, **knobs)


def test_params_match_flax_modules_with_filter_size_override():
  knobs = dict(width=0.5, filter_size=5, num_classes=7)
  assert (summary.count_params_from_spec("C", image_size=96, **knobs)
          == eval_shape_count("C", 96, **knobs))


def test_rows_of_net_d():
  rows = summary.layer_table("D")
  names = [r.name for r in rows]
  assert names[:3] == ["conv1_1", "conv1_2", "pool1"]
  assert names[-4:] == ["pool5", "fc6", "fc7", "fc8"]
  by_name = {r.name: r for r in rows}
  assert by_name["conv1_1"].output_shape == (224, 224, 64)
  assert by_name["conv1_1"].params == 3 * 3 * 3 * 64 + 64
  assert by_name["conv1_1"].macs == 224 * 224 * 3 * 3 * 3 * 64
  assert by_name["pool5"].output_shape == (7, 7, 512)
  assert (by_name["pool5"].params, by_name["pool5"].macs) == (0, 0)
  assert by_name["fc6"].params == 7 * 7 * 512 * 4096 + 4096
  assert by_name["fc6"].macs == 7 * 7 * 512 * 4096
  assert by_name["fc8"].output_shape == (1000,)
  # Activation memory: 224 * 224 * 64 float32 values for 8 images, or half in bfloat16.
  assert by_name["conv1_1"].activation_bytes(8, "float32") == 8 * 224 * 224 * 64 * 4
  assert by_name["conv1_1"].activation_bytes(8, "bfloat16") == 8 * 224 * 224 * 64 * 2
  assert by_name["conv1_1"].activation_bytes(8, jnp.bfloat16) == 8 * 224 * 224 * 64 * 2


def test_lrn_and_pool_rows_have_no_params_or_macs():
  rows = summary.layer_table("A-LRN")
  lrn = [r for r in rows if r.kind == "LRN"]
  assert [r.name for r in lrn] == ["norm1"]
  assert (lrn[0].params, lrn[0].macs, lrn[0].output_shape) == (0, 0, (224, 224, 64))
  assert len(rows) == len(summary.layer_table("A")) + 1


def test_c_keeps_1x1_convs_under_filter_size_override():
  rows = {r.name: r for r in summary.layer_table("C", filter_size=7)}
  assert rows["conv3_3"].kind == "conv1x1-256"
  assert rows["conv3_2"].kind == "conv7x7-256"


@pytest.mark.parametrize("size", [32, 100, 383])
def test_fc6_inputs_follow_image_size(size):
  fc6 = {r.name: r for r in summary.layer_table("A", image_size=size)}["fc6"]
  assert fc6.params == (size // 32) ** 2 * 512 * 4096 + 4096
  from_spec = summary.count_params_from_spec("A", image_size=size)
  assert from_spec == eval_shape_count("A", size)


@pytest.mark.parametrize("name", ["C", "B-5x5"])
def test_conv_macs_are_output_pixels_times_weights(name):
  for r in summary.layer_table(name, image_size=96, width=0.5):
    if r.kind.startswith("conv"):
      h, w, cout = r.output_shape
      assert r.macs == h * w * (r.params - cout), r.name


@pytest.mark.parametrize("knobs, pattern", [
    (dict(name="F"), r"Unknown VGG configuration 'F'; known names"),
    (dict(width=0), r"width must be > 0"),
    (dict(filter_size=4), r"positive odd integer.*got 4"),
    (dict(image_size=31), r"31x31 pixels.*at least 32 pixels"),
    (dict(fc_width=0), r"fc_width must be a positive integer"),
    (dict(num_classes=0), r"num_classes must be a positive integer"),
    (dict(channels=0), r"channels must be a positive integer"),
])
def test_bad_knobs_raise_models_errors(knobs, pattern):
  name = knobs.pop("name", "D")
  with pytest.raises(ValueError, match=pattern):
    summary.layer_table(name, **knobs)


def test_format_table_ends_with_total_line():
  text = summary.format_table(summary.layer_table("E"), batch_size=2, dtype="bfloat16")
  lines = text.splitlines()
  assert lines[-1] == "total: params=143,667,240 macs=19,632,062,464"
  assert any(line.startswith("fc8 ") for line in lines)
  assert "bfloat16" in lines[0]


def test_human_bytes():
  assert summary.human_bytes(512) == "512 B"
  assert summary.human_bytes(1536) == "1.5 KiB"
  assert summary.human_bytes(224 * 224 * 64 * 4) == "12.2 MiB"
  assert summary.human_bytes(3 * 2 ** 30) == "3.0 GiB"


def run_cli(*args):
  return subprocess.run([sys.executable, "-m", "vgg_jax.summary", *args],
                        capture_output=True, text=True, timeout=120)


def test_cli_prints_table_and_exact_total_line():
  result = run_cli("--model=D")
  assert result.returncode == 0, result.stderr
  lines = result.stdout.rstrip("\n").splitlines()
  assert lines[-1] == "total: params=138,357,544 macs=15,470,264,320"
  assert any(line.startswith("conv5_3 ") for line in lines)
  assert any(line.startswith("pool5 ") and "7x7x512" in line for line in lines)


def test_cli_knobs_and_errors():
  result = run_cli("--model=vgg13_5x5", "--num_classes=10", "--image_size=64",
                   "--width=0.25", "--fc_width=64", "--batch_size=4", "--dtype=bfloat16")
  assert result.returncode == 0, result.stderr
  t = summary.totals("B-5x5", num_classes=10, image_size=64, width=0.25, fc_width=64)
  assert result.stdout.splitlines()[-1] == f"total: params={t.params:,} macs={t.macs:,}"
  bad = run_cli("--model=D", "--filter_size=4")
  assert bad.returncode != 0
  assert "filter_size must be a positive odd integer" in bad.stderr
