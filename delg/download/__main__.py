"""``python -m delg.download``: see :mod:`delg.download.cli`."""

import sys

from delg.download.cli import main

sys.exit(main())
