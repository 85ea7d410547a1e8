"""The train step, its device mappings, the metrics, the plateau controller and config
validation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from vgg_jax import config_checks
from vgg_jax import metrics as metrics_lib
from vgg_jax import models
from vgg_jax import parallel
from vgg_jax import plateau
from vgg_jax import train


def tiny_config(**overrides):
  config = default.get_config()
  config.model = "A"
  config.width = 1 / 16
  config.fc_width = 16
  config.init = "he"
  config.dropout_rate = 0.0  # per-device dropout masks depend on the device split
  config.batch_size = 16
  config.crop_size = 32
  config.channels = 1
  config.learning_rate = 0.05
  for key, value in overrides.items():
    config[key] = value
  return config


def global_batches(num_steps, batch_size, seed=0):
  rng = np.random.default_rng(seed)
  for _ in range(num_steps):
    yield dict(image=rng.normal(size=(batch_size, 32, 32, 1)).astype(np.float32),
               label=rng.integers(0, 10, size=(batch_size,)).astype(np.int32))


def run_steps(config, mapping, num_steps=4):
  """Trains `num_steps` steps on fixed global batches; returns host params, metrics."""
  model = models.from_config(config, 10)
  host_state = train.create_train_state(jax.random.key(0), config, model)
  state = mapping.replicate(host_state)
  rng = mapping.replicate(jax.random.key_data(jax.random.key(1)))
  lr = mapping.replicate(np.float32(config.learning_rate))
  step = mapping.map(lambda s, b, r, l: train.train_step(s, b, jax.random.wrap_key_data(r),
                                                         l))
  n = mapping.local_device_count
  for batch in global_batches(num_steps, config.batch_size):
    per_device = jax.tree_util.tree_map(lambda x: x.reshape((n, -1) + x.shape[1:]), batch)
    state, metrics = step(state, mapping.shard(per_device), rng, lr)
    jax.block_until_ready(metrics)
  return mapping.unreplicate(state.params), mapping.unreplicate(metrics)


def assert_trees_close(a, b, **tol):
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, **tol), a, b)


def test_eight_devices_equal_one_device():
  """Section 3.3: synchronous data parallelism gives the single-device result."""
  assert jax.local_device_count() == 8
  config = tiny_config()
  one, m1 = run_steps(config, parallel.DeviceMapping("pmap", jax.local_devices()[:1]))
  eight, m8 = run_steps(config, parallel.DeviceMapping("pmap"))
  assert_trees_close(one, eight, rtol=2e-4, atol=2e-6)
  np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
  # And the parameters moved: the comparison is not between two untouched inits.
  model = models.from_config(config, 10)
  init = train.create_train_state(jax.random.key(0), config, model).params
  assert np.abs(init["fc8"]["kernel"] - eight["fc8"]["kernel"]).max() > 1e-3


def test_pmap_and_shard_map_give_the_same_result():
  config = tiny_config()
  by_pmap, _ = run_steps(config, parallel.DeviceMapping("pmap"), num_steps=3)
  by_shard_map, _ = run_steps(config, parallel.DeviceMapping("shard_map"), num_steps=3)
  assert_trees_close(by_pmap, by_shard_map, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("max_bytes, reads", [(10**6, 1), (100, 3)])
def test_resident_batches_are_read_once_when_they_fit(max_bytes, reads):
  """Three passes over four batches of 8 x 16 bytes: one read from the host when kept
  on the devices, three when over the budget; the same batches each pass. A pass left
  half-way keeps nothing."""
  mapping = parallel.DeviceMapping("pmap")
  made = []

  def make_batches():
    made.append(1)
    return ({"x": np.full((8, 16), i, np.uint8)} for i in range(4))

  passes = mapping.resident(make_batches, max_bytes=max_bytes)
  next(passes())  # abandoned after one batch
  made.clear()
  for _ in range(3):
    seen = [int(np.asarray(b["x"])[0, 0]) for b in passes()]
    assert seen == [0, 1, 2, 3]
  assert len(made) == reads


def test_loss_falls_on_a_repeated_batch():
  config = tiny_config(batch_size=8)
  mapping = parallel.DeviceMapping("pmap", jax.local_devices()[:2])
  model = models.from_config(config, 10)
  state = mapping.replicate(
      train.create_train_state(jax.random.key(0), config, model))
  rng = mapping.replicate(jax.random.key_data(jax.random.key(1)))
  lr = mapping.replicate(np.float32(0.01))
  step = mapping.map(lambda s, b, r, l: train.train_step(s, b, jax.random.wrap_key_data(r),
                                                         l))
  batch = next(global_batches(1, 8))
  batch = mapping.shard(jax.tree_util.tree_map(lambda x: x.reshape((2, 4) + x.shape[1:]),
                                               batch))
  losses = []
  for _ in range(30):
    state, metrics = step(state, batch, rng, lr)
    losses.append(float(mapping.unreplicate(metrics)["loss"]))
  assert losses[-1] < 0.5 * losses[0], losses


def test_weight_decay_spares_biases():
  config = tiny_config(learning_rate=0.1, weight_decay=0.5, momentum=0.0)
  tx = train.create_optimizer(config)
  params = {"conv": {"kernel": jnp.ones((3, 3, 1, 2)), "bias": jnp.ones((2,))}}
  zero_grads = jax.tree_util.tree_map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  np.testing.assert_allclose(updates["conv"]["kernel"], -0.1 * 0.5)
  np.testing.assert_allclose(updates["conv"]["bias"], 0.0)


def test_top_k():
  logits = jnp.array([[0.1, 0.5, 0.2, 0.9, 0.0, 0.3]])
  for label, top1, top5 in [(3, 1, 1), (1, 0, 1), (4, 0, 0)]:
    labels = jnp.array([label])
    assert float(metrics_lib.correct_top_k(logits, labels, 1)[0]) == top1
    assert float(metrics_lib.correct_top_k(logits, labels, 5)[0]) == top5


def test_a_diverged_net_is_never_right():
  # NaN compares false with everything: without care, no class would beat the label's.
  logits = jnp.array([[jnp.nan] * 6, [0.1, 0.9, 0.0, 0.2, 0.3, 0.4]])
  labels = jnp.array([0, 1])
  for k in (1, 5):
    np.testing.assert_array_equal(metrics_lib.correct_top_k(logits, labels, k), [0.0, 1.0])


# ------------------------------------------------------------------ plateau controller

def run_plateau(config, accuracies):
  state = plateau.initial_state(config)
  trace = []
  for accuracy in accuracies:
    state = plateau.update(config, state, accuracy)
    trace.append(state)
  return trace


def test_plateau_drops_at_the_right_evaluation():
  config = plateau.PlateauConfig(learning_rate=0.01, patience=2, threshold=0.01,
                                 max_drops=3)
  accuracies = [0.30, 0.40, 0.405, 0.40,  # no real gain twice: drop after the 4th
                0.50, 0.55, 0.55, 0.55,   # drop after the 8th
                0.60, 0.60, 0.60,         # drop after the 11th (the third and last)
                0.61, 0.61]               # plateau after the last drop: stop
  trace = run_plateau(config, accuracies)
  rates = [s.learning_rate for s in trace]
  np.testing.assert_allclose(rates[:3], 0.01)
  np.testing.assert_allclose(rates[3:7], 1e-3)
  np.testing.assert_allclose(rates[7:10], 1e-4)
  np.testing.assert_allclose(rates[10:], 1e-5)
  assert [s.drops for s in trace][-1] == 3
  assert [s.stopped for s in trace] == [False] * 12 + [True]


def test_plateau_never_drops_more_than_configured_and_can_keep_going():
  config = plateau.PlateauConfig(learning_rate=1.0, patience=1, max_drops=2,
                                 stop_after_last=False)
  trace = run_plateau(config, [0.5] * 10)
  assert max(s.drops for s in trace) == 2
  assert not any(s.stopped for s in trace)
  assert trace[-1].learning_rate == pytest.approx(0.01)


def test_plateau_state_round_trips_through_json():
  config = plateau.PlateauConfig(patience=1)
  state = run_plateau(config, [0.3, 0.2, 0.25])[-1]
  assert plateau.PlateauState.from_json(state.to_json()) == state
  resumed = run_plateau(config, [0.3, 0.2, 0.25, 0.1, 0.1])
  restarted = plateau.PlateauState.from_json(state.to_json())
  for accuracy in [0.1, 0.1]:
    restarted = plateau.update(config, restarted, accuracy)
  assert restarted == resumed[-1]


@pytest.mark.parametrize("field,value,message", [
    ("learning_rate", 0.0, "learning_rate must be > 0"),
    ("learning_rate", -1.0, "learning_rate must be > 0"),
])
def test_bad_learning_rate(field, value, message):
  with pytest.raises(ValueError, match=message):
    config_checks.validate_config(tiny_config(**{field: value}))


@pytest.mark.parametrize("field,value,message", [
    ("patience", 0, "plateau.patience must be >= 1"),
    ("factor", 1.5, r"plateau.factor must be in \(0, 1\)"),
    ("max_drops", -1, "plateau.max_drops must be >= 0"),
])
def test_bad_plateau_fields(field, value, message):
  config = tiny_config()
  config.plateau[field] = value
  with pytest.raises(ValueError, match=message):
    config_checks.validate_config(config)


@pytest.mark.parametrize("field,value,message", [
    ("log_every_steps", 0, "log_every_steps must be at least 1, got 0"),
    ("keep_checkpoints", 0, "keep_checkpoints must be at least 1, got 0"),
    ("eval_every_steps", 0, r"eval_every_steps must be at least 1 \(or None\), got 0"),
    ("checkpoint_every_steps", -5, "checkpoint_every_steps must be at least 0"),
    ("shuffle_buffer", -5, "shuffle_buffer must be at least 1, got -5"),
    ("color_shift_std", -0.1, "color_shift_std must be >= 0"),
    ("batch_size", 0, "batch_size must be a positive multiple of the 8 devices"),
    ("final_eval_protocols", "dense,multicrop", r"Unknown evaluation protocol\(s\) "
     r"\['multicrop'\]"),
])
def test_bad_loop_fields(field, value, message):
  with pytest.raises(ValueError, match=message):
    config_checks.validate_config(tiny_config(**{field: value}))


def test_batch_not_divisible_by_devices():
  with pytest.raises(ValueError, match="not divisible by the 8 devices") as error:
    config_checks.validate_config(tiny_config(batch_size=12))
  assert "e.g. 8 or set the number of CPU devices, e.g. XLA_FLAGS=" in str(error.value)


def test_unknown_mapping_and_model():
  with pytest.raises(ValueError, match="Unknown device mapping"):
    config_checks.validate_config(tiny_config(mapping="vmap"))
  with pytest.raises(ValueError, match="Unknown VGG configuration 'F'"):
    config_checks.validate_config(tiny_config(model="F"))


def test_schedule_from_dataset_size():
  config = tiny_config(batch_size=16, num_epochs=3)
  schedule = train.Schedule.create(config, num_train=100)
  assert dataclasses.astuple(schedule) == (6, 18, 6, 1000)


def test_bfloat16_compute_keeps_float32_parameters():
  config = tiny_config(dtype="bfloat16")
  params, metrics = run_steps(config, parallel.DeviceMapping("pmap",
                                                             jax.local_devices()[:2]))
  leaves = jax.tree_util.tree_leaves(params)
  assert all(leaf.dtype == np.float32 for leaf in leaves)
  assert all(np.isfinite(leaf).all() for leaf in leaves)
  reference, reference_metrics = run_steps(
      tiny_config(), parallel.DeviceMapping("pmap", jax.local_devices()[:2]))
  np.testing.assert_allclose(metrics["loss"], reference_metrics["loss"], rtol=0.05)


def test_benchmark_runs_the_real_step():
  from vgg_jax import benchmark  # pylint: disable=g-import-not-at-top
  result = benchmark.benchmark(model="A", batch_size=16, dtype="float32", width=1 / 16,
                               fc_width=16, image_size=32, num_classes=10, steps=2,
                               warmup=1)
  assert result["devices"] == 8 and result["images_per_second"] > 0
  assert result["macs_per_image"] == 701_344  # summary.count_macs of this net
  assert benchmark.known_peak("NVIDIA H100 80GB HBM3", "bfloat16") == 989.0


def test_the_pytorch_comparison_times_the_same_net():
  """The benchmark's PyTorch side builds the same layers: the same parameter count as
  our net (A-LRN's LRN included), and it times a real step."""
  pytest.importorskip("torch")
  from vgg_jax import benchmark  # pylint: disable=g-import-not-at-top
  for name in ("A", "A-LRN", "B-5x5"):
    peer = benchmark.torch_benchmark(model=name, batch_size=4, width=1 / 16, fc_width=16,
                                     image_size=32, num_classes=10, steps=1, warmup=1)
    net = models.create_model(name, width=1 / 16, fc_width=16, num_classes=10)
    assert peer["num_params"] == models.count_params(
        models.param_shapes(net, (32, 32, 3)))
    assert peer["images_per_second"] > 0
