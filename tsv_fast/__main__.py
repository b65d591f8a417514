"""``python -m tsv_fast``: the ``tsv-fast`` command line."""

import sys

from .cli import main

sys.exit(main())
