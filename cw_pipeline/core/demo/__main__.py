"""``python -m cw_pipeline.core.demo [ROOT]``: generate the demo benchmark under ROOT."""

from cw_pipeline.core.demo.generate import main

main()
