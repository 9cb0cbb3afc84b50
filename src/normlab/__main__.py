"""``python -m normlab`` is the same as the ``normlab`` command."""

import sys

from .cli import main

if __name__ == "__main__":  # --jobs workers import this module again: they must not run it
    sys.exit(main())
