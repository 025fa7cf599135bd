"""``python -m bench``: the HTTP benchmark (:mod:`bench.harness`)."""

import sys

from bench.harness import main

sys.exit(main())
