"""Test setup: eight fake CPU devices, so that multi-device code runs on any machine.

The flag must be set before JAX initialises its backends, hence here.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
