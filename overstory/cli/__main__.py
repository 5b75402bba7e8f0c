"""``python -m overstory.cli``: the ``overstory`` command."""

import sys

from .main import main

sys.exit(main())
