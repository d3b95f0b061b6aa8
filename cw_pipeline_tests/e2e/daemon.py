"""Drive the real ``dagster-daemon`` over a temporary demo project (test and benchmark).

:class:`DaemonProject` lays out a copy of the demo configuration with its own warehouse,
reports, images and ``DAGSTER_HOME`` (on-disk SQLite, shared by every process), materializes
it with ``cw-pipeline demo --no-ui``, then starts ``dagster-daemon run`` (what
``dagster dev`` starts besides the UI: a code server, and the daemon over a workspace pointing
at it), each in its own process group. It reads what happened from
the instance: runs, materializations per asset and partition, forward passes, timestamps, and
the CPU time of the daemon's whole process tree (daemon, code server, run workers).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from cw_pipeline.runtime.instance import INSTANCE_YAML
from cw_pipeline_tests.e2e.processes import free_port, stop_group

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CLK_TCK = os.sysconf("SC_CLK_TCK")

#: Assets of the demo (keys as user strings).
DEMO_A = "demo-a"
DEMO_B = "demo-b"
#: The demo's evaluations with distractors.
DEMO_DISTRACTOR_EVALUATIONS = ("demo-a-distractors", "demo-b-distractors")


def demo_config(root: Path) -> Path:
    """The project's datasets YAML with warehouse, reports and demo images under ``root``."""
    text = (REPO / "data" / "datasets.yaml").read_text()
    text = text.replace("warehouse: warehouse", f"warehouse: {root / 'warehouse'}")
    text = text.replace("reports: reports", f"reports: {root / 'reports'}")
    text = text.replace("demo/demo-", f"{root}/demo/demo-")
    cfg = root / "datasets.yaml"
    cfg.write_text(text)
    return cfg


def _own_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of one process itself, without its children."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _tree_cpu_seconds(root_pid: int) -> float:
    """CPU seconds (user + system) of a process and all its descendants, live or reaped."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        pid = int(entry)
        parents[pid] = int(fields[1])
        # utime, stime, cutime, cstime: a process's own time and that of its reaped children
        times[pid] = sum(int(v) for v in fields[11:15]) / CLK_TCK
    total = 0.0
    for pid, cpu in times.items():
        p = pid
        while p and p != root_pid:
            p = parents.get(p, 0)
        if p == root_pid:
            total += cpu
    return total


def start_in_own_group(cmd: list[str], env: dict[str, str], out) -> subprocess.Popen:
    """Start ``cmd`` from the repository root in a process group of its own, output to
    ``out`` (so :func:`stop_group` can end it with every child)."""
    return subprocess.Popen(
        cmd,
        env=env,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"the code server exited with {proc.returncode}"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        assert time.monotonic() < deadline, f"no code server on port {port} after {timeout} s"
        time.sleep(0.5)


@dataclass
class Snapshot:
    """What the instance holds at one moment."""

    runs: dict[str, str]  #: run id -> status
    materializations: Counter  #: "key" or "key[partition]" -> count
    forward_passes: int
    feature_cpu_seconds: float  #: inside the features steps (forward passes)
    step_cpu_seconds: float  #: inside every asset's step (``cpu_seconds`` metadata)
    cpu_seconds: float  #: of the daemon's and the code server's process trees
    map_forward_passes: int = 0  #: run by rankings steps for OnA / re-ranking maps
    at: float = field(default_factory=time.time)


class DaemonProject:
    """A temporary demo project, materialized, with ``dagster-daemon`` running over it."""

    def __init__(self, root: Path, env: dict[str, str] | None = None):
        self.root = root
        self.config = demo_config(root)
        self.home = root / "dagster_home"
        self.home.mkdir(exist_ok=True)
        (self.home / "dagster.yaml").write_text((REPO / INSTANCE_YAML).read_text())
        self.env = dict(
            os.environ, DAGSTER_HOME=str(self.home), CW_PIPELINE_CONFIG=str(self.config)
        )
        self.env["PATH"] = f"{BIN}{os.pathsep}{self.env.get('PATH', '')}"
        self.env.update(env or {})
        self.daemon: subprocess.Popen | None = None
        self.code_server: subprocess.Popen | None = None
        self.log = root / "daemon.log"
        self.runs_before_daemon = 0

    # ------------------------------------------------------------------ set-up

    def images(self, dataset: str) -> Path:
        return self.root / "demo" / dataset / "jpg"

    def generate(self) -> None:
        from cw_pipeline.core.demo import generate_demo

        generate_demo(self.root / "demo")

    def cli(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [str(BIN / "cw-pipeline"), *args],
            env=self.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert proc.returncode == 0, f"cw-pipeline {' '.join(args)}: {proc.stderr[-3000:]}"
        return proc

    def materialize_all(self) -> dict:
        out = self.cli("demo", "--no-ui", "--json")
        return json.loads(out.stdout.strip().splitlines()[-1])

    # ------------------------------------------------------------------ the daemon

    def start_daemon(self) -> None:
        """A code server, then ``dagster-daemon run`` over a workspace pointing at it — what
        ``dagster dev`` starts besides the UI (a daemon given ``workspace.yaml`` directly
        re-imports the code location every 60 s)."""
        port = free_port()
        workspace = self.root / "workspace.yaml"
        workspace.write_text(
            "load_from:\n  - grpc_server:\n      host: 127.0.0.1\n"
            f"      port: {port}\n      location_name: cw_pipeline\n"
        )
        server = [
            str(BIN / "dagster"),
            "code-server",
            "start",
            *("-h", "127.0.0.1", "-p", str(port)),
            *("-m", "cw_pipeline.definitions", "--location-name", "cw_pipeline"),
            *("--log-level", "warning"),
        ]
        with self.log.open("wb") as out:
            self.code_server = start_in_own_group(server, self.env, out)
            _wait_for_port(port, self.code_server, timeout=180)
            daemon = [str(BIN / "dagster-daemon"), "run", "-w", str(workspace)]
            self.daemon = start_in_own_group(daemon, self.env, out)

    def stop_daemon(self) -> None:
        stop_group(self.daemon)
        stop_group(self.code_server)
        self.daemon = self.code_server = None

    def cpu_breakdown(self) -> dict[str, float]:
        """CPU seconds by role: the daemon, the code server (sensor ticks, automation), and the
        run workers (the code server's children, live or reaped)."""
        out = {}
        for name, proc in (("daemon", self.daemon), ("code server", self.code_server)):
            if proc is None:
                continue
            total = _tree_cpu_seconds(proc.pid)
            own = _own_cpu_seconds(proc.pid)
            out[name] = own
            out[f"{name} children"] = total - own
        return out

    def processes_cpu_seconds(self) -> float:
        """CPU seconds of the daemon's and the code server's process trees (run workers
        are the code server's children)."""
        return sum(
            _tree_cpu_seconds(p.pid) for p in (self.daemon, self.code_server) if p is not None
        )

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    # ------------------------------------------------------------------ observing

    def instance(self):
        import dagster as dg

        os.environ["DAGSTER_HOME"] = str(self.home)
        return dg.DagsterInstance.get()

    def snapshot(self) -> Snapshot:
        import dagster as dg

        with self.instance() as instance:
            runs = {r.run_id: r.status.value for r in instance.get_runs()}
            mats: Counter = Counter()
            passes, map_passes, feature_cpu, step_cpu = 0, 0, 0.0, 0.0
            for key in instance.get_asset_keys():
                records = instance.fetch_materializations(
                    dg.AssetRecordsFilter(asset_key=key), limit=10_000
                ).records
                for rec in records:
                    mat = rec.asset_materialization
                    name = key.to_user_string()
                    if mat.partition is not None:
                        name += f"[{mat.partition}]"
                    mats[name] += 1
                    cpu = mat.metadata.get("cpu_seconds")
                    cpu = float(cpu.value) if cpu is not None else 0.0
                    step_cpu += cpu
                    if key.path[-1] == "cam_features":
                        passes += int(mat.metadata["forward_passes"].value)
                        feature_cpu += cpu
                    if key.path[-1] == "rankings" and "map_forward_passes" in mat.metadata:
                        map_passes += int(mat.metadata["map_forward_passes"].value)
        cpu_now = self.processes_cpu_seconds()
        return Snapshot(runs, mats, passes, feature_cpu, step_cpu, cpu_now, map_passes)

    def latest_materialization_time(self, key: str) -> float | None:
        import dagster as dg

        with self.instance() as instance:
            event = instance.get_latest_materialization_event(dg.AssetKey.from_user_string(key))
        return None if event is None else event.timestamp

    def wait_until_quiet(
        self, quiet_seconds: float, timeout: float, since: Snapshot | None = None
    ) -> Snapshot:
        """Wait until no run is queued or running and no new run appeared for
        ``quiet_seconds`` (longer than the sensors' intervals); with ``since``, also until at
        least one run started after it."""
        active = {"QUEUED", "NOT_STARTED", "STARTING", "STARTED", "CANCELING"}
        deadline = time.monotonic() + timeout
        last_change = time.monotonic()
        last_runs: dict[str, str] = {}
        while True:
            for proc in (self.daemon, self.code_server):
                assert proc is not None and proc.poll() is None, (
                    "dagster-daemon or its code server exited:\n" + self.log_tail()
                )
            # Only the runs while waiting (the full snapshot reads every materialization: a
            # poll of it every second took a sixth of a core from the daemon it measures).
            with self.instance() as instance:
                runs = {r.run_id: r.status.value for r in instance.get_runs()}
            if runs != last_runs:
                last_runs, last_change = runs, time.monotonic()
            busy = any(s in active for s in runs.values())
            started = since is None or len(runs) > len(since.runs)
            if not busy and started and time.monotonic() - last_change >= quiet_seconds:
                return self.snapshot()
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"not quiet after {timeout:.0f} s (runs: {runs}); daemon log:\n"
                    + self.log_tail()
                )
            time.sleep(2.0)

    # ------------------------------------------------------------------ a change

    def change_demo_a(self, extra_source: Path, round: int = 0) -> dict[str, list[Path]]:
        """Add 3 images, re-encode 1 (named by the ground truth), delete 1 (an extra image
        that the ground truth does not name). ``round`` k picks other images for the k-th
        change (k below the number of extras :meth:`seed_extra_images` seeded). Returns the
        paths by kind."""
        from PIL import Image

        jpg = self.images(DEMO_A)
        sources = sorted(extra_source.glob("*.jpg"))
        added = []
        for k, src in enumerate(sources[len(sources) - 3 * (round + 1) :][:3]):
            dst = jpg / (f"user_added_{k}.jpg" if round == 0 else f"user_added_{round}_{k}.jpg")
            shutil.copyfile(src, dst)
            added.append(dst)
        originals = sorted(p for p in jpg.glob("*.jpg") if not p.name.startswith("user_"))
        target = originals[1 + round]
        with Image.open(target) as img:
            img.load()
            reencoded = img.convert("RGB")
        tmp = target.with_name(f".{target.name}.tmp")
        reencoded.save(tmp, format="JPEG", quality=70)
        os.replace(tmp, target)
        deleted = jpg / f"user_extra_{round}.jpg"
        deleted.unlink()
        return {"added": added, "reencoded": [target], "deleted": [deleted]}

    def seed_extra_images(self, extra_source: Path, n: int = 2) -> list[Path]:
        """Images of the user's own in demo-a (not in its ground truth), before indexing."""
        out = []
        for k, src in enumerate(sorted(extra_source.glob("*.jpg"))[:n]):
            dst = self.images(DEMO_A) / f"user_extra_{k}.jpg"
            shutil.copyfile(src, dst)
            out.append(dst)
        return out


def delta(before: Snapshot, after: Snapshot) -> tuple[dict[str, str], Counter]:
    """Runs created and materializations recorded between two snapshots."""
    runs = {r: s for r, s in after.runs.items() if r not in before.runs}
    mats = Counter(
        {k: n - before.materializations.get(k, 0) for k, n in after.materializations.items()}
    )
    return runs, +mats
