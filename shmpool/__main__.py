import sys

from shmpool.cli import main

sys.exit(main())
