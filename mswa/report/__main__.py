"""``python -m mswa.report``: see :mod:`mswa.report.cli`."""

import sys

from mswa.report.cli import main

sys.exit(main())
