"""Start-up of a run: seconds from the command to the end of the first training step, and where they go.

    python bench/startup.py                         # the demo, 3 runs after one that warms the caches
    python bench/startup.py --config mnist-mosaickd-letters --runs 2 num_workers=1
    python bench/startup.py --submit --runs 2       # `ray job submit` to a running local cluster
    python bench/startup.py --job-overhead --runs 3 # jobs that only print a line: Ray's own share of a job

Each run is ``python -m rayoodkd.train --config CONFIG max_steps=2 eval.every=2`` in a fresh process and its
own storage (a new MLflow store each time, as a first run in a new directory has). The warm-up run fills the
caches (the builtin sets, the teacher, the decoded corpora); add ``data.decoded_cache_mb=0`` to time
decoding the corpora at every launch, as before the decoded cache. The wall time to the
worker's "first step" console line is measured from outside (Python start-up and imports included); the
breakdown is the run's own account (MLflow tags ``startup/*``; ``total`` counts from ``launch()`` on): the
driver's checks, Ray start, corpus materialisation and MLflow run, the worker group's start (Ray Train
workers, their imports, the process group), the worker's set-up, its evaluation sets, the teacher's test
accuracy and the first step itself. Rank 0 opens its MLflow store in a thread that it joins at the run's
first log (step 2 here), so the rest of that thread's work is not in these figures.

``--submit`` times what a user of a running cluster waits for: a head node is started once with
``clusters/local.sh up`` (2 CPUs, no worker node, token authentication as that script sets it; not timed),
then every run is ``ray job submit --working-dir REPO -- python -m rayoodkd.train ...`` through
``clusters/local.sh submit``, timed from the submit command to the job's first-step line (the upload of the
working dir, the job's driver start and its log streaming included); ``ray`` is then the time to join the
cluster. The cluster is torn down at the end, even on failure.

To time two checkouts side by side, run each with its checkout on ``PYTHONPATH`` from a directory outside
both: ``python -m rayoodkd.train`` puts the working directory first on ``sys.path``, ahead of ``PYTHONPATH``.

``--job-overhead`` submits, on the same kind of cluster, jobs that run no rayoodkd code: ``print`` prints a
line, ``import`` imports ``rayoodkd.launch`` (the driver's modules) and then prints it; each is timed from
the submit command to that line, so what a job costs before ``launch()`` splits into Ray's job machinery
(the submit CLI, the working dir's upload, the job supervisor, the driver's process) and our imports.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path

LOCAL_SH = Path(__file__).resolve().parents[1] / "clusters" / "local.sh"

PHASES = (
    "total",
    "checks",
    "ray",
    "data",
    "mlflow",
    "workers",
    "setup",
    "eval_sets",
    "teacher_test",
    "first_step",
)


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free ports (each socket stays bound until all are chosen)."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


@contextmanager
def local_cluster() -> Iterator[dict[str, str]]:
    """A running one-node cluster from clusters/local.sh (free ports, its own short temp dir) -> the
    environment that ``local.sh submit`` needs; torn down on exit."""
    gcs, dashboard, client, agent = _free_ports(4)
    env = {
        **os.environ,
        # `ray` is this interpreter's, as with an activated venv.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        # Ray's unix socket paths must stay under 107 bytes: a short temp dir.
        "RAYOODKD_LOCAL_DIR": tempfile.mkdtemp(prefix="rk-", dir="/tmp"),
        "NUM_WORKERS": "0",
        "HEAD_CPUS": "2",
        "GCS_PORT": str(gcs),
        "DASHBOARD_PORT": str(dashboard),
        "CLIENT_PORT": str(client),
        "AGENT_PORT_BASE": str(agent),
    }
    try:
        subprocess.run(["bash", str(LOCAL_SH), "up"], env=env, check=True)
        yield env
    finally:
        # `down` also stops a head that `up` left half started.
        subprocess.run(["bash", str(LOCAL_SH), "down"], env=env, check=False)
        shutil.rmtree(env["RAYOODKD_LOCAL_DIR"], ignore_errors=True)


def _seconds_to_line(command: list[str], env: dict[str, str] | None, wanted: Callable[[str], bool]) -> float:
    """Wall seconds from starting ``command`` to its first output line that is ``wanted``; the command must
    succeed and print one."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    seconds = None
    for line in process.stdout:
        if seconds is None and wanted(line):
            seconds = time.perf_counter() - started
    if process.wait() != 0 or seconds is None:
        raise SystemExit(f"failed or printed no such line: {' '.join(command)}")
    return seconds


def one_run(
    config: str, overrides: list[str], storage: Path, cluster: dict[str, str] | None = None
) -> dict[str, float]:
    """One run in a fresh process (or a job on ``cluster``) -> {"command": wall s to the first step line,
    phase: s, ...}."""
    from mlflow.tracking import MlflowClient

    train = [sys.executable, "-m", "rayoodkd.train", "--config", config, "max_steps=2", "eval.every=2"]
    train += [*overrides, f"storage_path={storage}", "run_name=startup", "system_metrics=false"]
    if cluster is None:
        command, env = train, None
    else:
        command, env = ["bash", str(LOCAL_SH), "submit", "--", *train], cluster
    first_step = _seconds_to_line(command, env, lambda line: "first step" in line and "after launch" in line)
    client = MlflowClient(f"sqlite:///{storage / 'mlflow.db'}")
    run = client.search_runs(client.get_experiment_by_name("rayoodkd").experiment_id)[0]
    tags = run.data.tags
    return {"command": first_step} | {p: float(tags.get(f"startup/{p}_s", "nan")) for p in PHASES}


EMPTY_JOBS = {
    "print": "print('FIRST LINE', flush=True)",
    "import": "import rayoodkd.launch; print('FIRST LINE', flush=True)",
}


def empty_job(code: str, cluster: dict[str, str]) -> float:
    """Seconds from ``local.sh submit -- python -c CODE`` to the job's line that starts with FIRST LINE."""
    command = ["bash", str(LOCAL_SH), "submit", "--", "python", "-c", code]
    return _seconds_to_line(command, cluster, lambda line: line.startswith("FIRST LINE"))


def job_overhead(runs: int) -> None:
    """``runs`` jobs of each kind in :data:`EMPTY_JOBS`, alternating, after one warm-up of each."""
    times: dict[str, list[float]] = {name: [] for name in EMPTY_JOBS}
    with local_cluster() as cluster:
        for index in range(runs + 1):
            for name, code in EMPTY_JOBS.items():
                seconds = empty_job(code, cluster)
                label = "warm-up" if index == 0 else f"run {index}"
                print(f"{label} {name}: first line after {seconds:.2f} s")
                if index:
                    times[name].append(seconds)
    for name, values in times.items():
        print(f"{name}: median {statistics.median(values):.2f} s to the first line ({runs} jobs)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="demo")
    parser.add_argument("--runs", type=int, default=3, help="timed runs after the warm-up run")
    parser.add_argument(
        "--submit", action="store_true", help="submit every run as a job to a running local cluster"
    )
    parser.add_argument(
        "--job-overhead",
        action="store_true",
        help="instead of runs, time jobs that only print a line (and import rayoodkd's driver modules)",
    )
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.job_overhead:
        if args.submit or args.overrides or args.config != "demo":
            parser.error("--job-overhead runs jobs of its own: no --submit, --config or overrides")
        job_overhead(args.runs)
        return
    rows = []
    with (
        tempfile.TemporaryDirectory(prefix="rayoodkd-startup-") as scratch,
        local_cluster() if args.submit else nullcontext() as cluster,
    ):
        for index in range(args.runs + 1):
            storage = Path(scratch) / f"run{index}"
            row = one_run(args.config, args.overrides, storage, cluster)
            print(
                ("warm-up " if index == 0 else f"run {index}   ")
                + "  ".join(f"{k} {v:.1f}" for k, v in row.items())
            )
            if index:
                rows.append(row)
    print(f"\n| {args.config} | " + " | ".join(("command", *PHASES)) + " |")
    print("|---|" + "---|" * (len(PHASES) + 1))
    print(
        "| median s | "
        + " | ".join(f"{statistics.median(r[k] for r in rows):.1f}" for k in ("command", *PHASES))
        + " |"
    )


if __name__ == "__main__":
    main()
