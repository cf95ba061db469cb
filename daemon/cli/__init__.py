"""The ``kbsync`` command line: the main group (``main``), ``kbsync facts`` (``facts``), ``kbsync eval``
(``evaluate``) and the client of a running daemon (``client``). Imports the core below it, never the reverse."""
from .main import Ctx, cli, main

__all__ = ["Ctx", "cli", "main"]
