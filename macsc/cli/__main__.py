"""``python -m macsc.cli``: the ``macsc`` command."""

import sys

from macsc.cli.dispatch import main

sys.exit(main())
