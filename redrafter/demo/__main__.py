"""`python -m redrafter.demo` (what `make demo` runs): the demo, with a one-line error and exit
status 2 for a missing model, missing data or any other bad input."""

from __future__ import annotations

import sys

import click

from redrafter.demo.run import main
from redrafter.errors import RedrafterError


def run() -> None:
    """Run the demo; a `RedrafterError` ends it with its message and exit status 2."""
    try:
        main()
    except RedrafterError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    run()
