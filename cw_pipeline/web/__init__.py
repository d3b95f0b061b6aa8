"""The search page: ``cw-pipeline serve`` (a Starlette app served by uvicorn).

:mod:`cw_pipeline.web.engine` holds what a search needs (models, loaded databases, images by
manifest id), with what it does split by concern: :mod:`~cw_pipeline.web.searching` (a search
and its answer), :mod:`~cw_pipeline.web.listing` (targets, images, thumbnails),
:mod:`~cw_pipeline.web.detail` (a result's CAM view) and :mod:`~cw_pipeline.web.common` (what
they share); :mod:`cw_pipeline.web.app` is the HTTP side (the page and its JSON API).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DEFAULT_PORT", "serve"]

#: Where ``cw-pipeline serve`` listens unless ``--port`` says otherwise (the UI is on 3000).
DEFAULT_PORT = 3001


def serve(
    config_path: Path | None,
    host: str,
    port: int,
    *,
    dagster_url: str,
    max_upload_bytes: int,
    map_cache_bytes: int | None = None,
    max_searches: int | None = None,
) -> None:
    """Serve the search page on ``host:port`` until interrupted."""
    import uvicorn

    from cw_pipeline.core import allocator
    from cw_pipeline.web.app import create_app
    from cw_pipeline.web.engine import (
        DEFAULT_MAP_CACHE_BYTES,
        DEFAULT_MAX_SEARCHES,
        SearchEngine,
    )

    # Searches run the CNN on uvicorn's thread pool: before those threads start, make them
    # allocate from the main heap, whose freed buffers are kept (core/allocator.py).
    allocator.keep_freed_memory(one_arena=True)

    engine = SearchEngine(
        config_path,
        dagster_url=dagster_url,
        max_upload_bytes=max_upload_bytes,
        map_cache_bytes=DEFAULT_MAP_CACHE_BYTES if map_cache_bytes is None else map_cache_bytes,
        max_searches=DEFAULT_MAX_SEARCHES if max_searches is None else max_searches,
    )
    engine.config()  # a bad configuration fails here, not on the first request
    uvicorn.run(create_app(engine), host=host, port=port, log_level="warning")
