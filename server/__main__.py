"""`python -m server ...` is the same as the `mergeserve` console script."""

import sys

from server.cli import main

if __name__ == "__main__":
    sys.exit(main())
