"""`python -m kiqa.cli <command> ...`: the `kiqa` command without its console script
(what kiqa prints when the script is not where this Python's scripts are)."""

import sys

from kiqa.cli import main

sys.exit(main())
