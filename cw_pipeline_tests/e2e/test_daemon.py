"""Incremental indexing under the real ``dagster-daemon`` (sensors, automation, run queue).

The demo is materialized on a temporary instance, the daemon started over it (what
``dagster dev`` runs besides the UI, with the project's default intervals), then images of
demo-a are added, re-encoded and deleted while it runs. Everything affected must be
materialized exactly once, nothing else, with no failed run, and the CLI must then find
nothing to do.
"""

from __future__ import annotations

import json

import dagster as dg
import pytest

from cw_pipeline.runtime.run_tags import LAUNCHER_TAG
from cw_pipeline_tests.e2e.daemon import (
    DEMO_A,
    DEMO_B,
    DEMO_DISTRACTOR_EVALUATIONS,
    DaemonProject,
    delta,
)

#: Longer than the folder sensors' 15 s and the automation sensor's 10 s: no run appearing
#: for this long after the last one ended means the daemon has nothing more to do.
QUIET_SECONDS = 40


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> DaemonProject:
    project = DaemonProject(tmp_path_factory.mktemp("daemon"))
    project.generate()
    # two photos of the user's own among demo-a's (not named by the ground truth)
    project.seed_extra_images(project.images("demo-distractors"))
    out = project.materialize_all()
    assert not out["checks"]["failed"], out["checks"]
    project.runs_before_daemon = len(project.snapshot().runs)
    project.start_daemon()
    yield project
    project.stop_daemon()


def test_daemon_refreshes_each_affected_asset_exactly_once(project: DaemonProject) -> None:
    # Over a current instance the daemon starts nothing at all (every run so far is one of
    # `cw-pipeline demo`'s, all successful).
    before = project.wait_until_quiet(QUIET_SECONDS, timeout=240)
    assert set(before.runs.values()) == {"SUCCESS"}, before.runs
    assert len(before.runs) == project.runs_before_daemon

    changed = project.change_demo_a(project.images("demo-distractors"))
    after = project.wait_until_quiet(QUIET_SECONDS, timeout=300, since=before)
    runs, mats = delta(before, after)

    assert all(status == "SUCCESS" for status in runs.values()), (runs, project.log_tail())
    # the shard's indexing run(s), one refresh run, then one run per distractor shard of
    # demo-b-distractors re-projected with demo-b's new PCA (2), which sets off nothing else
    assert len(runs) <= 3 + 1 + 2, runs
    # each run's worker was forked warm (deploy/dagster.yaml's WarmRunLauncher), not spawned
    with project.instance() as instance:
        launched = {r: instance.get_run_by_id(r).tags.get(LAUNCHER_TAG) for r in runs}
    assert set(launched.values()) == {"warm"}, launched

    touched = sorted(k for k in mats if k.startswith(f"{DEMO_A}/manifest["))
    assert touched, mats
    for key in touched:
        shard = key[key.index("[") :]
        assert mats[key] == 1, mats
        assert mats[f"{DEMO_A}/cam_features{shard}"] == 1, mats
    expected = {
        *touched,
        *(k.replace("/manifest[", "/cam_features[") for k in touched),
        f"{DEMO_A}/descriptors",
        f"{DEMO_A}/rankings",
        f"{DEMO_A}/map_report",
        f"{DEMO_B}/pca_model",  # learned on demo-a
        f"{DEMO_B}/descriptors",
        f"{DEMO_B}/rankings",
        f"{DEMO_B}/map_report",
        # The evaluations with distractors follow their dataset at once: demo-a's with the
        # distractor descriptors it has (demo-a's PCA did not change); demo-b's with its 40
        # distractors (under reproject_at_once) projected with demo-b's new PCA by its
        # rankings, in the same run; their stored descriptors follow in runs of their own.
        *(
            f"{ev}/{name}"
            for ev in DEMO_DISTRACTOR_EVALUATIONS
            for name in ("rankings", "map_report")
        ),
        *(f"demo-b-distractors/demo-distractors_descriptors[{s}]" for s in ("b000", "b001")),
    }
    # exactly these, once each: not demo-a's PCA (learned on demo-b), not the query features
    # (no query image changed), not demo-a-distractors' distractor descriptors
    assert dict(mats) == dict.fromkeys(sorted(expected), 1), mats
    # all four reports in one run, the one that learned demo-b's new PCA
    with project.instance() as instance:
        run_of = {
            key: instance.get_latest_materialization_event(dg.AssetKey.from_user_string(key)).run_id
            for key in (
                f"{DEMO_B}/pca_model",
                *(f"{ev}/map_report" for ev in (DEMO_A, DEMO_B, *DEMO_DISTRACTOR_EVALUATIONS)),
            )
        }
    assert len(set(run_of.values())) == 1, run_of
    # one forward pass per image added or changed, none for the others: the features step kept
    # their maps, so no rankings step (OnA, re-ranking) runs the network again
    assert after.forward_passes - before.forward_passes == 4
    assert after.map_forward_passes - before.map_forward_passes == 0

    # every file the user added is still on disk, the deleted one stays deleted
    for path in changed["added"] + changed["reencoded"]:
        assert path.is_file(), path
    assert not changed["deleted"][0].exists()

    # The CLI then finds nothing to do: no run, no forward pass, nothing refreshed; the
    # demo generator leaves the user's folder alone (the edited file keeps its new bytes).
    kept = {p: p.read_bytes() for p in changed["added"] + changed["reencoded"]}
    out = json.loads(project.cli("index", "--dataset", DEMO_A, "--json", "--quiet").stdout)
    assert (out["indexed_shards"], out["forward_passes"], out["refreshed"]) == ([], 0, [])
    final = project.snapshot()
    assert final.runs.keys() == after.runs.keys()
    assert {p: p.read_bytes() for p in kept} == kept
    assert not changed["deleted"][0].exists()
