"""``python -m fixedram``: the ``fixedram`` command."""

import sys

from fixedram.cli.main import main

sys.exit(main())
