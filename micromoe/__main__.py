"""`python -m micromoe ...` runs the `micromoe` command (same subcommands and options)."""

import sys

from micromoe.cli import main

if __name__ == "__main__":
    sys.exit(main())
