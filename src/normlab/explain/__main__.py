"""``python -m normlab.explain [options]``: the ``explain`` subcommand on its own."""

import sys

from ..cli import main

if __name__ == "__main__":
    sys.exit(main(["explain", *sys.argv[1:]]))
