"""Where the CPU of a Ray instance goes: every process's share of one core over a window, and the threads of
the processes that match a pattern, with their wake-ups per second.

    python bench/ray_processes.py --window 30                                  # whatever runs now
    python bench/ray_processes.py --window 30 --threads-of ray::RayTrainWorker  # beside a training run
    python bench/ray_processes.py --idle-actors 3 --window 30 --threads-of ray::NoWork

Run it beside a training run (e.g. the perf harness's ``ours_ray`` variant) once it is in its steady state.
``--idle-actors N`` first starts a Ray instance of its own (2 CPUs, no dashboard) with N actors that do
nothing, named ``NoWork``: what every Ray worker process costs when it has no work. Linux only (``/proc``).
Counted: every process with a command line (not kernel threads) but this script's own.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Sample:
    """One process or thread; for a process, ``name`` and ``wakeups`` are its main thread's."""

    name: str
    cpu_s: float
    wakeups: int


def _command(pid: str) -> str | None:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return None
    return " ".join(command.replace("\0", " ").split())


def _stat(path: str) -> Sample | None:
    """Name, CPU seconds (user + system) and voluntary context switches of a process or thread."""
    try:
        stat = Path(f"{path}/stat").read_text()
        status = Path(f"{path}/status").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    wakeups = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("voluntary_"))
    return Sample(
        stat[stat.index("(") + 1 : stat.rindex(")")],
        (int(fields[11]) + int(fields[12])) / CLOCK_TICKS,
        wakeups,
    )


def _snapshot(threads_of: list[str]) -> tuple[dict[str, tuple[str, Sample]], dict[str, dict[str, Sample]]]:
    processes, threads = {}, {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == os.getpid():
            continue
        command, sample = _command(pid), _stat(f"/proc/{pid}")
        if not command or sample is None:
            continue
        processes[pid] = (command, sample)
        if any(pattern in command for pattern in threads_of):
            try:
                tids = os.listdir(f"/proc/{pid}/task")
            except OSError:  # it ended since
                continue
            threads[pid] = {tid: s for tid in tids if (s := _stat(f"/proc/{pid}/task/{tid}")) is not None}
    return processes, threads


def report(window: float, threads_of: list[str]) -> None:
    """Print each process's CPU (% of one core) over ``window`` seconds, busiest first, and the threads of
    the processes whose command line contains one of ``threads_of``."""
    before_processes, before_threads = _snapshot(threads_of)
    started = time.perf_counter()
    time.sleep(window)
    after_processes, after_threads = _snapshot(threads_of)
    elapsed = time.perf_counter() - started
    rows = []
    for pid, (command, after) in after_processes.items():
        if pid in before_processes:
            share = 100 * (after.cpu_s - before_processes[pid][1].cpu_s) / elapsed
            if share >= 0.05:
                rows.append((share, pid, command))
    rows.sort(reverse=True)
    print(f"CPU over {elapsed:.1f} s, % of one core (load average {os.getloadavg()[0]:.2f}):")
    for share, pid, command in rows:
        print(f"{share:7.1f} %  {pid:>7}  {command[:100]}")
    shares = [share for share, *_ in rows]
    print(f"{sum(shares):7.1f} %  all ({sum(shares[1:]):.1f} % but the busiest)")
    for pid, threads in after_threads.items():
        print(f"\nthreads of {pid} ({after_processes[pid][0][:60]}): % of one core, wake-ups per second")
        earlier = before_threads.get(pid, {})
        rows = [
            (after.cpu_s - earlier[tid].cpu_s, after.wakeups - earlier[tid].wakeups, after.name)
            for tid, after in threads.items()
            if tid in earlier
        ]
        for cpu_s, wakeups, name in sorted(rows, reverse=True):
            if cpu_s > 0 or wakeups > 0:
                print(f"{100 * cpu_s / elapsed:7.2f} %  {wakeups / elapsed:6.0f}/s  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--window", type=float, default=30.0, help="seconds to measure")
    parser.add_argument(
        "--threads-of", nargs="*", default=[], help="command-line patterns to show threads of"
    )
    parser.add_argument(
        "--idle-actors", type=int, default=0, help="start Ray with this many idle actors first"
    )
    args = parser.parse_args()
    if args.idle_actors:
        import ray

        ray.init(num_cpus=2, include_dashboard=False)

        @ray.remote(num_cpus=0)
        class NoWork:
            def ready(self) -> bool:
                return True

        actors = [NoWork.remote() for _ in range(args.idle_actors)]
        ray.get([actor.ready.remote() for actor in actors])
        time.sleep(5)  # past the actors' start
    report(args.window, args.threads_of)


if __name__ == "__main__":
    main()
