"""`python -m fastsae`: the command line of fastsae.cli."""

import sys

from .cli import main

sys.exit(main())
