"""The ``clvr`` command line: one package, one module per command group, one shared module
(:mod:`.common`) for errors, shards, dtypes, devices and model sources."""

from clvr_agent.cli.main import app, main

__all__ = ["app", "main"]
