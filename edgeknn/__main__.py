"""``python -m edgeknn``: the same as the ``edgeknn`` command."""

import sys

from edgeknn.cli.main import main

sys.exit(main())
