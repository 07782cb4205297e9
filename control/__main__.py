"""`python -m control ...` = the `edgert` console script (control/cli/): every command."""
import sys

from control.cli import main

sys.exit(main())
