"""What drives the Dagster instance rather than defining the graph: run tags and run states
(:mod:`.run_tags`). Importing it loads Dagster only, never the asset graph."""
