"""`python -m modelkiln.cli`: the kiln command line, as the `kiln` entry point runs it."""

import sys

from modelkiln.cli import main

sys.exit(main())
