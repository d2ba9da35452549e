"""``python -m distkit``: the ``distkit`` command line (see ``distkit._cli``)."""

import sys

from ._cli import main

sys.exit(main())
