"""`python -m edgert ...` = the board's commands (edgert/cli.py)."""
import sys

from edgert.cli import main

sys.exit(main())
