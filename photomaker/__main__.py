"""``python -m photomaker``: see `photomaker.cli`."""

from photomaker.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
