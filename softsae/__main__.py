"""``python -m softsae ...``: the command line of softsae.cli."""

import sys

from softsae.cli import main

sys.exit(main())
