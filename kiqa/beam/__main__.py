"""`python -m kiqa.beam`: `kiqa score-beam` under another name (its options: kiqa/cli/score_beam.py)."""

import sys

from kiqa.cli.score_beam import main

sys.exit(main(prog="python -m kiqa.beam"))
