"""The ``agent-finetune`` command line; ``main`` is the console-script entry point."""

from agent_finetune.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
