"""``python -m normlab`` is the same as the ``normlab`` command."""

import sys

from .cli import main

sys.exit(main())
