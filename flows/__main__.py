"""`python -m flows ...`: the `segpipe` command (flows.command), where its script is not on PATH."""

import sys

from flows.command import main

sys.exit(main())
