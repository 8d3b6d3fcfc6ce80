"""``python -m photomaker.train`` and ``accelerate launch -m photomaker.train``."""

import sys

from .cli_args import main

if __name__ == "__main__":
    sys.exit(main())
