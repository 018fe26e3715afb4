"""How many CPUs this process may actually use: its affinity mask and its cgroup v2 quota, not the machine's count.

`os.cpu_count()` counts the machine's CPUs. In a container limited to 2 CPUs on a 64-core
host, or under `taskset -c 0`, sizing workers and ONNX Runtime's thread pools from it
starts many more runnable threads than there are CPUs to run them, and they preempt one
another (a cgroup quota even stalls the whole group for the rest of its period once spent).

A leaf of the standard library: the settings (worker count) and the repository (intra-op
threads) both read it. It lives under runtime/ because thread pools are the runtime's
business and every layer that needs it may import the runtime.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")

# Server processes dividing the usable CPUs between them: 1 unless this process is one of the
# supervisor's workers (share_among). Process-wide because it is a fact about the process.
_sharing_processes = 1

# The process's affinity mask before pin_worker narrowed it (None while nothing is pinned): the CPUs the
# process may use, which the pinned threads' own masks no longer show.
_process_mask: frozenset[int] | None = None
# The CPUs pin_worker gave this worker's threads (None while nothing is pinned).
_pinned: frozenset[int] | None = None


def affinity_cpus() -> int:
    """CPUs in this process's affinity mask (`taskset`, `docker --cpuset-cpus`); the machine's count where the
    platform has no affinity call."""
    if _process_mask is not None:
        return len(_process_mask)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS and Windows have no sched_getaffinity
        return max(1, os.cpu_count() or 1)


def read_cpu_max(path: Path) -> int | None:
    """The CPU count a cgroup v2 `cpu.max` file allows: quota / period rounded up; None when unlimited.

    The file holds "<quota> <period>" in microseconds, or "max <period>" for no limit.
    A missing, unreadable or malformed file also means no limit known: the quota is a
    refinement, and a server that cannot read it should still start.
    """
    try:
        fields = path.read_text().split()
    except OSError:
        return None
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    # A quota of 1.5 CPUs can keep two threads busy part of the time: round up, never to 0.
    return max(1, math.ceil(quota / period))


def cgroup_cpus(root: Path | None = None, proc_cgroup: Path | None = None) -> int | None:
    """The tightest cgroup v2 CPU quota over this process's cgroup and its ancestors; None when unlimited.

    A quota set on a parent cgroup (the container's) limits every cgroup below it, so the
    walk goes from the process's own cgroup (named by the "0::<path>" line of
    /proc/self/cgroup) up to the root. Without that line (cgroup v1, or no /proc) only
    `root/cpu.max` is read, which inside a container's cgroup namespace is the container's.
    Defaults (read at call time, so tests can point them elsewhere): CGROUP_ROOT, PROC_CGROUP.
    """
    root = CGROUP_ROOT if root is None else root
    proc_cgroup = PROC_CGROUP if proc_cgroup is None else proc_cgroup
    relative = ""
    try:
        for line in proc_cgroup.read_text().splitlines():
            if line.startswith("0::"):
                relative = line[3:].strip().strip("/")
                break
    except OSError:
        pass
    directory = root / relative if relative else root
    limits = []
    while True:
        limit = read_cpu_max(directory / "cpu.max")
        if limit is not None:
            limits.append(limit)
        if directory == root or root not in directory.parents:
            break
        directory = directory.parent
    return min(limits) if limits else None


def usable_cpus(root: Path | None = None, proc_cgroup: Path | None = None) -> int:
    """CPUs this process may use: the smaller of its affinity mask and its cgroup quota (at least 1)."""
    quota = cgroup_cpus(root, proc_cgroup)
    affinity = affinity_cpus()
    return max(1, min(affinity, quota) if quota is not None else affinity)


def share_among(processes: int) -> None:
    """Declares this process one of `processes` server workers that divide the usable CPUs between them.

    Each worker then sizes ONNX Runtime's pools for its own share: two workers on two CPUs,
    each with a pool of two threads, start four runnable threads for two CPUs, and on the
    MLP and CNN of bench/models.py that cost ~10% more CPU per request for ~6-10% less
    throughput at concurrency 64 than one thread each (docs/benchmarks.md).
    """
    global _sharing_processes
    _sharing_processes = max(1, processes)


def process_cpus(root: Path | None = None, proc_cgroup: Path | None = None) -> int:
    """CPUs this process's models may keep busy: usable_cpus() divided among the workers sharing them (at least 1)."""
    return max(1, usable_cpus(root, proc_cgroup) // _sharing_processes)


def machine_cpus() -> int:
    """The machine's CPU count, whatever this process may use of it."""
    return os.cpu_count() or 1


def worker_cpus(index: int, workers: int, mask: Sequence[int], quota: int | None) -> tuple[int, ...] | None:
    """The CPUs worker `index` of `workers` is pinned to (pin_worker), from the process's affinity `mask`
    (sorted) and its cgroup CPU `quota`; None: leave its threads to the kernel.

    Each worker gets its own contiguous slice of the mask, as many CPUs as share_among gives it (any remainder
    stays unpinned, free for the rest of the machine); more workers than CPUs take the CPUs in turn. Nothing is
    pinned for a lone worker, and nothing under a quota tighter than the mask: a quota lets the group spend its
    CPU time on any CPU of the mask, and pinning to a few of them would collide with whoever else runs there.
    """
    if workers < 2 or len(mask) < 2 or index < 0 or index >= workers:
        return None
    if quota is not None and quota < len(mask):
        return None
    if len(mask) < workers:
        return (mask[index % len(mask)],)
    size = len(mask) // workers
    return tuple(mask[index * size : (index + 1) * size])


def pin_worker(index: int, workers: int) -> tuple[int, ...] | None:
    """Pins every thread of this worker process, and so every thread it starts later, to its share of the CPUs
    (worker_cpus); returns them, or None when nothing was pinned.

    Why: a request crosses the event loop, gRPC's poller and event-engine threads and the model's instance
    thread. With two workers on two CPUs left to the kernel, each hand-off may wake a thread on the other CPU
    (an inter-processor interrupt, a cold cache); pinned, each worker's threads hand work to one another on
    one CPU. Measured on the 2-core machine (docs/benchmarks.md, "Workers pinned to their CPUs"). Call it
    early, before gRPC and ONNX Runtime start their threads: threads inherit the mask of the thread that
    starts them. gRPC's own threads are let go again once started (release_named_threads); a thread that must
    use every CPU of the process runs inside unpinned().
    """
    global _process_mask, _pinned
    try:
        mask = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity calls on this platform
        return None
    chosen = worker_cpus(index, workers, mask, cgroup_cpus())
    if chosen is None:
        return None
    _process_mask, _pinned = frozenset(mask), frozenset(chosen)
    for thread in _threads() or [0]:
        try:
            os.sched_setaffinity(thread, _pinned)
        except OSError:  # a thread that ended meanwhile
            pass
    return chosen


def _threads() -> list[int]:
    """The ids of this process's threads (empty where /proc cannot say)."""
    try:
        return [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        return []


def release_named_threads() -> int:
    """Lets every thread that gave itself a name of its own (gRPC's event-engine, timer and lifeguard threads)
    run on every CPU of the process again; returns how many. A no-op when nothing is pinned.

    Called once gRPC has started its threads, and again every few seconds (threads already on the whole mask
    are left alone and not counted). The event loop, gRPC's poller thread (a Python thread) and the
    models' threads keep the worker's CPU, where their hand-offs are cheap; the event engine, which reads and
    writes the sockets, may borrow another CPU while the loop runs a batch. Pinning it too cost the CNN 4% of its
    throughput at concurrency 64; released, it gained 6% (docs/benchmarks.md, "Workers pinned to their CPUs").
    Threads the released ones start later inherit the whole mask; the event engine also grows its pool from
    pinned threads at times, so a pinned worker calls this again every few seconds.
    """
    if _process_mask is None:
        return 0
    try:
        own_name = Path("/proc/self/comm").read_text()
    except OSError:
        return 0
    released = 0
    for thread in _threads():
        try:
            if (
                Path(f"/proc/self/task/{thread}/comm").read_text() != own_name
                and os.sched_getaffinity(thread) != _process_mask
            ):
                os.sched_setaffinity(thread, _process_mask)
                released += 1
        except OSError:  # a thread that ended meanwhile
            pass
    return released


def pinned_cpus() -> tuple[int, ...] | None:
    """The CPUs this worker's threads are pinned to, or None."""
    return tuple(sorted(_pinned)) if _pinned is not None else None


@contextlib.contextmanager
def unpinned() -> Iterator[None]:
    """Runs the calling thread on every CPU of the process for the duration (a no-op when nothing is pinned);
    threads started inside inherit that. For work sized for the whole process, such as a text-generation
    model's ONNX Runtime session and thread (their intra-op threads use usable_cpus(), not the worker's share).
    """
    if _process_mask is None or _pinned is None:
        yield
        return
    unpin_this_thread()
    try:
        yield
    finally:
        os.sched_setaffinity(0, _pinned)


def unpin_this_thread() -> None:
    """Lets the calling thread run on every CPU of the process from now on (a no-op when nothing is pinned)."""
    if _process_mask is not None:
        os.sched_setaffinity(0, _process_mask)
