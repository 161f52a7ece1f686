"""`python -m gptzoo`: the `gptzoo` command."""

from gptzoo.cli import entry

entry()
