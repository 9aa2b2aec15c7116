"""`python -m bot` is `atelier run`."""

import sys

from bot.cli import main

sys.exit(main(["run", *sys.argv[1:]]))
