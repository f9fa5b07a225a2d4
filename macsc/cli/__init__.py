"""The ``macsc`` command: the dispatcher, the LightningCLI, and one module per subcommand."""

from macsc.cli.dispatch import main

__all__ = ["main"]
