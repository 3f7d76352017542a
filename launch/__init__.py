"""The `es-serve` command line (`launch.cli:main`), the set-up script and ready configurations."""
