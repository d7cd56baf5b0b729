"""What a ``fastmeta`` subcommand is: its help line, its arguments and what it runs.

Each tool module defines one (``COMMAND``, or ``BUILD``/``INFO``); :mod:`fastmeta.tools.cli`
lists them and imports only the chosen one.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Subcommand:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]
