"""``python -m cw_pipeline.cli``: the ``cw-pipeline`` command line."""

import sys

from cw_pipeline.cli import main

sys.exit(main())
