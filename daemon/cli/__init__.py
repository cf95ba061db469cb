"""The ``kbsync`` command line: the main group (``main``), ``kbsync facts`` (``facts``) and the client of a
running daemon (``client``); ``kbsync eval`` comes from the benchmark package (evaluation/cli.py). Imports the
core below it, never the reverse."""
from .main import Ctx, cli, main

__all__ = ["Ctx", "cli", "main"]
