"""`python -m deepvis.cli` = `deepvis` (used by `deepvis submit --working-dir`)."""

from deepvis.cli import run_and_exit

run_and_exit()
