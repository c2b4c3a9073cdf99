"""``python -m lipschitz_ext.bench``: the same as the ``lipschitz-bench`` command."""

import sys

from ..cli.bench import main

sys.exit(main())
