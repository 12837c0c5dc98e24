"""``python -m runtime`` (in a bundle) or ``python -m exporters.runtime``: see run.py."""

import sys

from .run import main

sys.exit(main())
