"""Errors a user can fix, and the command-line layer that turns them into one line.

Library code raises these (never ``SystemExit``); ``run_cli`` wraps each command's ``main`` so a
user error prints ``error: <message>`` on stderr and exits with status 2, without a traceback.
"""

from __future__ import annotations

import sys
from typing import Callable, Optional


class UserError(ValueError):
    """Something the user passed cannot work; the message names it and what would."""


class ConfigError(UserError):
    """A setting with an invalid value: the message names the setting and the valid values."""


class EvalError(UserError):
    """An evaluation that cannot run as asked; the message names the bad value and what would work."""


def run_cli(main: Callable[[Optional[list[str]]], object], argv: Optional[list[str]] = None) -> None:
    """Run a command's ``main``; a ``UserError`` becomes one line on stderr and exit status 2."""
    try:
        main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
