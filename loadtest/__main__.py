"""`python -m loadtest ...`: see loadtest/cli.py."""

import sys

from .cli import main

sys.exit(main())
