"""`python -m sparsecore`: see sparsecore.cli."""

import sys

from sparsecore.cli import main

sys.exit(main())
