"""`python -m raftkv ...` is the `raftkv` command."""

import sys

from raftkv.cli import main

sys.exit(main())
