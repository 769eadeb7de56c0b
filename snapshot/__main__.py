"""`python -m snapshot`: see snapshot.cli."""

import sys

from snapshot.cli import main

sys.exit(main())
