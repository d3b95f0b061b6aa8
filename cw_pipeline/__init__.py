"""cw_pipeline."""
