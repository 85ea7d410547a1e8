"""Does depth pay off with more training? Nets A, D and E for three epochs, three seeds.

The companion of depth_vs_filter_size.py. There, after one epoch, the deeper nets had
the higher error (results/depth_vs_filter_size/): a deeper net needs more updates to
fit. The paper's claim (error falls from A to D and E) is about nets trained until
their validation accuracy stops improving. This sweep gives A (11 weight layers), D
(16) and E (19) three times the budget, with the demo's plateau schedule left on, so
that a run whose accuracy stalls divides its learning rate by 10 as in the paper.

  python -m vgg_jax.sweep --sweep=experiments/depth_with_more_epochs.py \\
      --workdir=runs/depth_with_more_epochs
  python -m vgg_jax.report --sweep_dir=runs/depth_with_more_epochs

Measured: 39 minutes for the 9 trials on 2 CPU cores. Results (A 13.13 ± 0.42, D
13.37 ± 0.47, E 14.03 ± 0.30 top-1 error %): experiments/results/depth_with_more_epochs/
and README.md ("What our ablation shows").
"""

from vgg_jax import sweep


def get_sweep():
  return sweep.Sweep(
      config="configs/demo.py",
      base={
          "num_epochs": 3.0,
          "eval_every_steps": 234,        # twice an epoch, as in the demo
          "checkpoint_every_steps": 234,
          "log_every_steps": 50,
      },
      trials=[dict(group="A", model="A"), dict(group="D", model="D"),
              dict(group="E", model="E")],
      seeds=(0, 1, 2),
  )
