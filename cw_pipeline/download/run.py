"""Running a download plan (:func:`run_plan`): fetch, verify and extract every item not yet
done, one line per step, and the summary."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cw_pipeline.download.archives import safe_extract
from cw_pipeline.download.plan import DownloadPlan
from cw_pipeline.download.transfer import CHECKS, DEFAULT_TIMEOUT, fetch, file_sha256, size_text


def run_plan(
    plan: DownloadPlan,
    *,
    progress: bool = False,
    log: Callable[[str], None] | None = print,
    keep_archives: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
    retries: int | None = None,
) -> dict[str, Any]:
    """Fetch, verify and extract every item not yet done; returns a summary.

    Archives are deleted after a successful extraction unless ``keep_archives``; ``log``
    (None: silent) receives one line per step.
    """
    say = log or (lambda _line: None)
    fetched: list[dict[str, Any]] = []
    skipped = 0
    extracted_files = 0
    for item in plan.items:
        if item.done:
            skipped += 1
            continue
        if not (item.kind == "archive" and item.dest.is_file()):
            say(f"{plan.name}: fetching {item.url}")
            res = fetch(
                item.url,
                item.dest,
                size=item.known.size,
                sha256=item.known.sha256,
                check=CHECKS[item.check] if item.check else None,
                timeout=timeout,
                retries=retries,
                progress=progress,
            )
            verified = "size and sha256 verified" if item.known.sha256 else "no known sha256"
            resumed = f", resumed at {size_text(res.resumed_from)}" if res.resumed_from else ""
            say(
                f"{plan.name}: {item.dest.name}: {size_text(res.size)}{resumed}, "
                f"sha256 {res.sha256} ({verified})"
            )
            fetched.append({"url": item.url, "path": str(res.path), "sha256": res.sha256})
            digest = res.sha256
        else:
            digest = file_sha256(item.dest)
        if item.kind == "archive":
            assert item.extract_to is not None and item.marker is not None
            say(f"{plan.name}: extracting {item.dest.name} into {item.extract_to}")
            n = safe_extract(
                item.dest,
                item.extract_to,
                flatten=item.flatten,
                strip_prefix=item.strip_prefix,
                marker=item.marker,
                marker_info={"url": item.source, "sha256": digest},
            )
            extracted_files += n
            say(f"{plan.name}: {n} files from {item.dest.name}")
            if not keep_archives:
                item.dest.unlink(missing_ok=True)
    summary = {
        "name": plan.name,
        "layout": plan.layout,
        "images": str(plan.images),
        "groundtruth": None if plan.groundtruth is None else str(plan.groundtruth),
        "fetched": fetched,
        "extracted_files": extracted_files,
        "already_done": skipped,
        "configured": plan.configured,
    }
    if plan.configured:
        say(f"{plan.name}: ready ({plan.config})")
    else:
        say(
            f"{plan.name}: ready; uncomment its entry in {plan.config} (images: {plan.images}"
            + (f", groundtruth: {plan.groundtruth}" if plan.groundtruth else "")
            + ")"
        )
    return summary
