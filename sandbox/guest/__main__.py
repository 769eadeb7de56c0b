import sys

from sandbox.guest.runtime import main

sys.exit(main())
