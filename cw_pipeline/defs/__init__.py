"""Dagster wiring only: one factory per asset (:mod:`.assets`), checks, the indexing jobs,
sensors, schedules, resources, executors, partitions, data versions and automation conditions.
:func:`.graph.build_definitions` assembles them for a project; importing a piece of this
package does not build the graph."""
