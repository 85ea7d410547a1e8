"""How every command of the package ends on a user's mistake.

A bad value, file or flag ends the command with its message (which names the problem
and the fix) on stderr, no Python traceback, and exit status 2. Bugs keep their
tracebacks, and VGG_JAX_TRACEBACK=1 shows them for user errors too. Every
`python -m vgg_jax.<command>` runs its main through `run`.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable, Sequence

from absl import app
from absl import flags

# What a user's input raises: a bad value (ValueError, which includes malformed JSON),
# a missing, unreadable or misplaced file or directory (OSError).
USER_ERRORS = (ValueError, OSError, app.UsageError)
EXIT_USER_ERROR = 2
TRACEBACK_VARIABLE = "VGG_JAX_TRACEBACK"


def run(main: Callable[[Sequence[str]], None]) -> None:
  """`absl.app.run(main)`, with user errors reported as described above."""
  app.run(functools.partial(_reporting_user_errors, main), flags_parser=_parse_flags)


def _reporting_user_errors(main, argv):
  try:
    return main(argv)
  except USER_ERRORS as e:
    _exit_with(e)


def _parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing. A flag's bad value, a missing config file or a misspelt config
  field (ml_collections raises it while parsing the overrides) ends as a user error."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, OSError, AttributeError, KeyError, TypeError, ValueError) as e:
    _exit_with(e)


def _exit_with(error: BaseException) -> None:
  if os.environ.get(TRACEBACK_VARIABLE):
    raise error
  command = os.path.splitext(os.path.basename(sys.argv[0]))[0]
  message = str(error).replace("\\n", " ").replace("\\'", "'")
  message = " ".join(message.split())
  if len(message) > 1 and message[0] == message[-1] and message[0] in "'\"":
    message = message[1:-1]  # (a KeyError's message comes quoted)
  print(f"{command}: error: {message}", file=sys.stderr)
  sys.exit(EXIT_USER_ERROR)


def config_flag(name: str = "config"):
  """The ConfigDict of a config_flags flag. The file is read, and its overrides applied,
  on this first access: a missing file or a misspelt field is a user error here."""
  try:
    return flags.FLAGS[name].value
  except (OSError, AttributeError, KeyError, TypeError) as e:
    raise ValueError(f"--{name}: {e}") from e
