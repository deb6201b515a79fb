"""`python -m fastkv_cli` runs the command line, like the `fastkv` script."""

from fastkv_cli.app import app

app()
