"""Trains a VGG net: `python -m vgg_jax.main --config=configs/vgg16.py --workdir=DIR`.

Everything happens in libraries that are easy to test (`train.py`, `input_pipeline.py`,
`models.py`); this file only reads flags and the config. Any config field can be set on
the command line, e.g. `--config.batch_size=128 --config.dtype=bfloat16`. Running the
same command again with the same workdir resumes the run from its newest checkpoint.
"""

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from vgg_jax import train

FLAGS = flags.FLAGS

flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and metrics.")
config_flags.DEFINE_config_file(
    "config", None, "A config file under configs/, e.g. configs/vgg16.py.",
    lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])
# Multi-host launch (with --config.distributed=True). Left unset, JAX detects them on
# SLURM, Open MPI, TPU pods and Kubernetes, or reads JAX_COORDINATOR_ADDRESS.
flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Number of processes.")
flags.DEFINE_integer("process_id", None, "This process's index.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = FLAGS.config
  if config.distributed:
    # Every process runs this same command. On CPUs, collectives across processes
    # need gloo (GPUs and TPUs have their own).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes,
                               process_id=FLAGS.process_id)
  logging.info("JAX process %d of %d; local devices: %s", jax.process_index(),
               jax.process_count(), jax.local_devices())
  train.train_and_evaluate(config, FLAGS.workdir)


if __name__ == "__main__":
  jax.config.config_with_absl()
  app.run(main)
