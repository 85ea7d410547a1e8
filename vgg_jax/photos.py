"""Real photos that ship inside a Python package, for tests, benchmarks and demos.

foolbox 3.3.4 carries 20 ImageNet validation photos in foolbox/data/ (imagenet_*.jpg).
They are found here as files, without importing foolbox.
"""

from __future__ import annotations

import importlib.util
import os


def foolbox_data_dir() -> str | None:
  """foolbox/data of an installed foolbox, found without importing it; None without."""
  spec = importlib.util.find_spec("foolbox")
  if spec is None or not spec.submodule_search_locations:
    return None
  return os.path.join(list(spec.submodule_search_locations)[0], "data")
