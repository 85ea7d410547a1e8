"""VGG (Simonyan & Zisserman, 2015) in JAX/Flax."""

import os

from vgg_jax import xla_flags

# Before any module of the package imports JAX, so that every command, test and
# notebook gets them (a backend started earlier keeps its own flags).
os.environ["XLA_FLAGS"] = xla_flags.with_package_flags(os.environ.get("XLA_FLAGS", ""))
