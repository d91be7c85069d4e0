"""``python -m rayoodkd`` is ``python -m rayoodkd.train``."""

import sys

from rayoodkd.train import main

sys.exit(main())
