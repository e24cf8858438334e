"""``python -m kms_async``: the same command line as ``kms-async``."""

import sys

from ._cli import main

if __name__ == "__main__":
    sys.exit(main())
