"""``python -m phems_clinical ...`` is the same as the ``phems`` command."""

import sys

from phems_clinical.app.cli import main

sys.exit(main())
