"""The code location loaded by ``dagster dev -w workspace.yaml`` (and ``dg``)."""

from cw_pipeline.config import load_config
from cw_pipeline.defs.graph import build_definitions

defs = build_definitions(load_config())
