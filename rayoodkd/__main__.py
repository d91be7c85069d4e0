"""``python -m rayoodkd COMMAND ...`` is the ``rayoodkd`` command (``--help`` lists the commands)."""

import sys

from rayoodkd.cli import main

if __name__ == "__main__":
    sys.exit(main())
