"""`python -m kiqa.beam --input ... --model ... --output ... [Beam pipeline options]`."""

import sys

from kiqa.cli.score_beam import main

sys.exit(main(prog="python -m kiqa.beam"))
