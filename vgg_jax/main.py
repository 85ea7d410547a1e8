"""Trains a VGG net: `python -m vgg_jax.main --config=configs/vgg16.py --workdir=DIR`.

Everything happens in libraries that are easy to test (`train.py`, `evaluate.py`,
`input_pipeline.py`, `models.py`); this file reads flags and the config and wires a run:
training, then the paper's test protocols if the config asks for them, then the run's
report. Any config field can be set on the command line, e.g. `--config.batch_size=128
--config.dtype=bfloat16`. Running the same command again with the same workdir resumes
the run from its newest checkpoint.
"""

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags

from vgg_jax import checkpointing
from vgg_jax import cli
from vgg_jax import config_checks
from vgg_jax import datasets
from vgg_jax import evaluate
from vgg_jax import models
from vgg_jax import plots
from vgg_jax import train

FLAGS = flags.FLAGS


def run(config: ml_collections.ConfigDict, workdir: str, *,
        accept_config_changes: bool = False) -> dict:
  """One run, as this command does it (and `vgg_jax.sweep` for each trial).

  1. training, resumed from WORKDIR's checkpoints (`train.train_and_evaluate`; a
     resume with another recipe needs ACCEPT_CONFIG_CHANGES);
  2. the test protocols of config.final_eval_protocols on the last net (section 3.2,
     `evaluate.evaluate_run`: WORKDIR/eval_table.md);
  3. the report: WORKDIR/final_eval.json (which marks the run finished), the learning
     curves and the confusion matrix of the last validation.
  Returns training's final metrics (see `train.train_and_evaluate`).
  """
  config_checks.validate_config(config)
  for line in config_checks.unused_fields(config):
    logging.warning("Config: %s.", line)
  result = train.train_and_evaluate(config, workdir,
                                    accept_config_changes=accept_config_changes)
  if config.final_eval_protocols:
    evaluate.evaluate_run(config, workdir, protocols=config.final_eval_protocols)
  if jax.process_index() == 0:
    last_eval = {k: v for k, v in result.items()
                 if k in ("loss", "top1_error", "top5_error", "loc_error", "examples")}
    checkpointing.write_final_eval(workdir, last_eval, result["confusion"])
    plots.plot_run(workdir, checkpointing.read_metrics(workdir), result["confusion"],
                   class_names=datasets.dataset_info(config).class_names,
                   title=f"{models.canonical_name(config.model)} on {config.dataset}")
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = cli.config_flag()
  if config.distributed:
    # Every process runs this same command. On CPUs, collectives across processes
    # need gloo (GPUs and TPUs have their own).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes,
                               process_id=FLAGS.process_id)
  logging.info("JAX process %d of %d; local devices: %s", jax.process_index(),
               jax.process_count(), jax.local_devices())
  run(config, FLAGS.workdir, accept_config_changes=FLAGS.accept_config_changes)


def _define_flags() -> None:
  """The command's flags (defined only when run as a program: `run` is a library)."""
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and metrics.")
  config_flags.DEFINE_config_file(
      "config", None, "A config file under configs/, e.g. configs/vgg16.py.",
      lock_config=True)
  flags.mark_flags_as_required(["config", "workdir"])
  flags.DEFINE_bool("accept_config_changes", False, "Resume a run with another recipe "
                    "(seed, data, optimiser, ...) than its own; the changes are recorded "
                    "in WORKDIR/config_changes.jsonl.")
  # Multi-host launch (with --config.distributed=True). Left unset, JAX detects them on
  # SLURM, Open MPI, TPU pods and Kubernetes, or reads JAX_COORDINATOR_ADDRESS.
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
  flags.DEFINE_integer("num_processes", None, "Number of processes.")
  flags.DEFINE_integer("process_id", None, "This process's index.")


if __name__ == "__main__":
  _define_flags()
  jax.config.config_with_absl()
  cli.run(main)
