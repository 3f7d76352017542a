"""The `es-serve` command line (`launch.cli:main`), the set-up script and ready configurations."""

from .cli import main

__all__ = ["main"]
