"""What drives the Dagster instance rather than defining the graph: run tags and run states
(:mod:`.run_tags`), opening the instance from concurrent processes (:mod:`.instance`), runs
whose process died (:mod:`.recovery`), the warm run launcher of ``deploy/dagster.yaml``
(:mod:`.launcher`); these load Dagster only, never the asset graph. :mod:`.runs` (the graph
run in-process by the CLI) and :mod:`.pending` (what automation will refresh) read the graph
from :mod:`cw_pipeline.defs`."""
