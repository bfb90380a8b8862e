"""`python -m redrafter ...`: the `redrafter` command, also as torchrun runs it
(`torchrun --nproc-per-node N -m redrafter train-drafter ...`)."""

from redrafter.cli import main

if __name__ == "__main__":
    main(prog_name="redrafter")
