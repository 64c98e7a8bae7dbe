"""``python -m map_merge.cli``: the ``map-merge`` command."""

import sys

from . import main

sys.exit(main())
