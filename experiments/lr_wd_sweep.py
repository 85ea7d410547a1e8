"""Learning rate x weight decay around the demo's recipe (section 3.1's 1e-2 and 5e-4).

  python -m vgg_jax.sweep --sweep=experiments/lr_wd_sweep.py --workdir=runs/lr_wd_sweep
  python -m vgg_jax.report --sweep_dir=runs/lr_wd_sweep

Net A of configs/demo.py (width 3/16) for 2 epochs each, one seed: 9 trials, measured
17 minutes on 2 CPU cores. The plateau schedule keeps its demo settings, so a run
whose accuracy stalls drops its rate (none did in two epochs). Results:
experiments/results/lr_wd_sweep/ and README.md.
"""

from vgg_jax import sweep


def get_sweep():
  return sweep.Sweep(
      config="configs/demo.py",
      base={"num_epochs": 2.0, "log_every_steps": 50, "checkpoint_every_steps": 234},
      grid={
          "learning_rate": [0.005, 0.02, 0.05],
          "weight_decay": [0.0, 5e-4, 5e-3],
      },
      seeds=(0,),
  )
