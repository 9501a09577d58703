"""``python -m oocseq``: the ``oocseq`` command (see :mod:`oocseq.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
