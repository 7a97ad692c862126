"""`python -m deepvis.cli` = `deepvis` (used by `deepvis submit --working-dir`)."""
import sys

from deepvis.cli import main

sys.exit(main())
