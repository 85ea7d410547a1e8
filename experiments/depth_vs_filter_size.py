"""Section 4.1 at demo scale: depth (nets A to E) against filter size (B-5x5; B with
5x5 and 7x7 filters at equal depth), on Fashion-MNIST, three seeds per net.

The paper: LRN (A-LRN) does not help; error falls with depth from A to E; C (1x1
convs) beats B but loses to D (3x3 convs, same depth); B-5x5, B with each pair of 3x3
convs replaced by one 5x5 conv, had a 7% higher top-1 error than B.

  python -m vgg_jax.sweep --sweep=experiments/depth_vs_filter_size.py \
      --workdir=runs/depth_vs_filter_size
  python -m vgg_jax.report --sweep_dir=runs/depth_vs_filter_size

The demo recipe (configs/demo.py: width 3/16, fc 256, S in [32, 36], 32x32 crops, lr
0.02, weight decay 5e-4, dropout 0.5), cut to ONE epoch (468 steps of 128 images,
validated twice) so that the 27 trials fit about an hour on 2 CPU cores. Measured: 66
minutes for the 27 trials, one after another; a trial of A to E took 1.4 to 1.8
minutes (about 1,350 img/s for A, 760 for D), B with 5x5 filters 4.3 and B with 7x7
filters 6.1 (290 and 190 img/s). One epoch is short of convergence: the seeds' spread
is 0.6 to 2.3 points of top-1 error. Results: experiments/results/depth_vs_filter_size/
and README.md ("What our ablation shows"); depth_with_more_epochs.py trains A, D and E
three times as long.
"""

from vgg_jax import sweep

# Like Table 3's rows: (group, overrides of the demo config).
NETS = [
    ("A", dict(model="A")),
    ("A-LRN", dict(model="A-LRN")),
    ("B", dict(model="B")),
    ("C", dict(model="C")),
    ("D", dict(model="D")),
    ("E", dict(model="E")),
    ("B-5x5", dict(model="B-5x5")),          # shallower, same receptive field as B
    ("B filter 5", dict(model="B", filter_size=5)),  # B's depth, every 3x3 -> 5x5
    ("B filter 7", dict(model="B", filter_size=7)),  # B's depth, every 3x3 -> 7x7
]


def get_sweep():
  return sweep.Sweep(
      config="configs/demo.py",
      base={
          "num_epochs": 1.0,
          "eval_every_steps": 234,        # twice in the epoch
          "checkpoint_every_steps": 234,  # an interrupted trial loses half an epoch
          "log_every_steps": 50,
      },
      trials=[dict(group=group, **overrides) for group, overrides in NETS],
      seeds=(0, 1, 2),
  )
