"""`python -m redrafter.demo` (what `make demo` runs): the demo, with a one-line error and exit
status 2 for a missing model, missing data or any other bad input."""

from __future__ import annotations

import sys

import click

from redrafter.demo.run import main
from redrafter.errors import RedrafterError


@click.command(help="The redrafter demo on SmolLM2-135M-Instruct (what `make demo` runs).")
@click.option(
    "--retrain-drafter",
    is_flag=True,
    help="Train the demo drafters (fp32, and the int4 bundle's) again from the shared data (~65 "
    "min on an idle 2-core CPU; an estimate and a bar per phase are shown) instead of using the "
    "ones shipped in the package.",
)
def run(retrain_drafter: bool) -> None:
    """Run the demo; a `RedrafterError` ends it with its message and exit status 2."""
    try:
        main(retrain_drafter=retrain_drafter)
    except RedrafterError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    run()
