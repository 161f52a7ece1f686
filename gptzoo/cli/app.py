"""The `gptzoo` command group, its one-line error reporting and its exit."""

import atexit
import functools
import logging
import sys
import traceback

import click

from gptzoo.errors import GptzooError
from gptzoo.workarounds import exit_without_teardown


def friendly_errors(command):
    """One line on stderr and exit status 1 for any error; `--debug` shows the traceback."""

    @click.option("--debug", is_flag=True, help="Show the full traceback on errors.")
    @functools.wraps(command)
    def wrapper(*args, debug: bool, **kwargs):
        if not debug:  # orbax logs failures it also raises: the one-line error says it once
            logging.getLogger("absl").setLevel(logging.CRITICAL)
        try:
            return command(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - every error is reported, none swallowed
            if debug:
                traceback.print_exc()
            message = str(e) if isinstance(e, GptzooError) else f"{type(e).__name__}: {e}"
            hint = "" if debug else " (--debug shows the traceback)"
            click.echo(f"error: {message.splitlines()[0] if message else type(e).__name__}{hint}",
                       err=True)
            sys.exit(1)

    return wrapper


@click.group()
def main():
    """gptzoo: decoder-only language models in Equinox."""


_output_complete = False  # set by a command once everything it does is done and written


def entry() -> None:
    """The installed `gptzoo` command (and `python -m gptzoo`): `main`, and then, after a
    command that set `_output_complete`, an exit without Python's final teardown of every module
    and object (`workarounds.exit_without_teardown`). Every atexit handler still runs first:
    this one is registered before any other, so it runs last."""
    atexit.register(_exit_if_complete)
    main()


def mark_output_complete() -> None:
    """Called by a command once all it does is done and written: `entry` then skips teardown."""
    global _output_complete
    _output_complete = True


def _exit_if_complete() -> None:
    if _output_complete:
        exit_without_teardown()
