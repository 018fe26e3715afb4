"""The CPUs the process may use: cgroup v2 quota files (fake ones here) and the affinity mask."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from server.runtime import cpus
from server.schema import model_config_pb2 as mc


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("max 100000\n", None),  # unlimited
        ("200000 100000\n", 2),
        ("150000 100000\n", 2),  # 1.5 CPUs: rounded up
        ("50000 100000\n", 1),  # half a CPU: still one thread
        ("100000 100000", 1),
        ("400000 50000\n", 8),
        ("", None),
        ("garbage\n", None),
        ("x 100000\n", None),
        ("100000 0\n", None),
        ("-1 100000\n", None),
    ],
)
def test_read_cpu_max(tmp_path: Path, text: str, expected: int | None) -> None:
    path = tmp_path / "cpu.max"
    path.write_text(text)
    assert cpus.read_cpu_max(path) == expected


def test_a_missing_cpu_max_means_no_limit(tmp_path: Path) -> None:
    assert cpus.read_cpu_max(tmp_path / "absent") is None


def fake_cgroups(tmp_path: Path, limits: dict[str, str], own: str | None) -> tuple[Path, Path]:
    """A cgroup tree under tmp_path/cg with cpu.max files, and a /proc/self/cgroup naming `own`."""
    root = tmp_path / "cg"
    for relative, text in limits.items():
        directory = root / relative if relative else root
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "cpu.max").write_text(text)
    proc = tmp_path / "proc_cgroup"
    proc.write_text(f"0::/{own}\n" if own is not None else "12:cpu,cpuacct:/docker/abc\n")
    return root, proc


def test_the_tightest_quota_on_the_way_to_the_root_counts(tmp_path: Path) -> None:
    root, proc = fake_cgroups(
        tmp_path, {"": "max 100000", "kube/pod": "300000 100000", "kube/pod/box": "max 100000"}, "kube/pod/box"
    )
    assert cpus.cgroup_cpus(root, proc) == 3
    root, proc = fake_cgroups(tmp_path, {"kube": "100000 100000", "kube/pod/box": "800000 100000"}, "kube/pod/box")
    assert cpus.cgroup_cpus(root, proc) == 1


def test_no_quota_anywhere_is_none(tmp_path: Path) -> None:
    root, proc = fake_cgroups(tmp_path, {"": "max 100000", "a": "max 100000"}, "a")
    assert cpus.cgroup_cpus(root, proc) is None
    assert cpus.cgroup_cpus(tmp_path / "nothing", tmp_path / "no_proc") is None


def test_without_a_v2_line_the_root_file_is_read(tmp_path: Path) -> None:
    """Inside a container's cgroup namespace the container's own limit is the root's file."""
    root, proc = fake_cgroups(tmp_path, {"": "250000 100000"}, None)
    assert cpus.cgroup_cpus(root, proc) == 3


def test_usable_is_the_smaller_of_quota_and_affinity(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    root, proc = fake_cgroups(tmp_path, {"": "100000 100000"}, "")
    assert cpus.usable_cpus(root, proc) == 1
    root, proc = fake_cgroups(tmp_path, {"": f"{(affinity + 5) * 100000} 100000"}, "")
    assert cpus.usable_cpus(root, proc) == affinity
    root, proc = fake_cgroups(tmp_path, {"": "max 100000"}, "")
    assert cpus.usable_cpus(root, proc) == affinity


def test_the_affinity_mask_counts_not_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert cpus.affinity_cpus() == 1


def test_settings_and_session_options_follow_the_usable_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    from server.repository import config as model_config
    from server.settings import Settings

    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    monkeypatch.setattr(cpus, "CGROUP_ROOT", Path("/nonexistent"))
    assert Settings().resolved_workers() == 1
    assert Settings(workers=3).resolved_workers() == 3  # an explicit count stands
    one = mc.ModelConfig(name="m")
    assert model_config.session_options(one, "cpu").intra_op_threads == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert Settings().resolved_workers() == 2
    assert model_config.session_options(one, "cpu").intra_op_threads == 8  # restricted: 8 of 64
    two = mc.ModelConfig(name="m", instance_group=[mc.ModelInstanceGroup(count=2)])
    assert model_config.session_options(two, "cpu").intra_op_threads == 4
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert model_config.session_options(one, "cpu").intra_op_threads == 0  # the whole machine: ORT's choice


def test_workers_divide_the_cpus_between_them(monkeypatch: pytest.MonkeyPatch) -> None:
    from server.repository import config as model_config

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(cpus, "CGROUP_ROOT", Path("/nonexistent"))
    monkeypatch.setattr(cpus, "_sharing_processes", 1)
    one = mc.ModelConfig(name="m")
    assert model_config.session_options(one, "cpu").intra_op_threads == 0  # alone on the machine: ORT's choice
    cpus.share_among(2)
    assert cpus.process_cpus() == 4
    assert model_config.session_options(one, "cpu").intra_op_threads == 4
    assert model_config.session_options(one, "cpu", share_with_workers=False).intra_op_threads == 0  # text models
    two = mc.ModelConfig(name="m", instance_group=[mc.ModelInstanceGroup(count=2)])
    assert model_config.session_options(two, "cpu").intra_op_threads == 2
    assert model_config.session_options(two, "cpu", share_with_workers=False).intra_op_threads == 4
    cpus.share_among(16)  # more workers than CPUs: still one thread each
    assert model_config.session_options(one, "cpu").intra_op_threads == 1
    explicit = mc.ModelConfig(name="m")
    explicit.parameters["intra_op_thread_count"].string_value = "3"
    assert model_config.session_options(explicit, "cpu").intra_op_threads == 3  # the config's own count stands


@pytest.mark.parametrize(
    ("index", "workers", "mask", "quota", "expected"),
    [
        (0, 2, [0, 1], None, (0,)),
        (1, 2, [0, 1], None, (1,)),
        (1, 2, [4, 6, 9, 11], None, (9, 11)),  # contiguous slices of the mask, whatever its CPU numbers
        (2, 3, [0, 1, 2, 3, 4, 5, 6, 7], None, (4, 5)),  # 8 // 3 = 2 each; CPUs 6 and 7 stay free
        (2, 3, [0, 1], None, (0,)),  # more workers than CPUs: the CPUs in turn
        (1, 3, [0, 1], None, (1,)),
        (0, 2, [0, 1, 2, 3], 4, (0, 1)),  # a quota as wide as the mask limits nothing
        (0, 2, [0, 1, 2, 3], 2, None),  # a tighter quota: the group may run anywhere in the mask
        (0, 1, [0, 1], None, None),  # a lone worker has nothing to share
        (0, 2, [3], None, None),  # one CPU: nothing to choose
        (2, 2, [0, 1], None, None),  # not a worker of this supervisor
    ],
)
def test_worker_cpus(
    index: int, workers: int, mask: list[int], quota: int | None, expected: tuple[int, ...] | None
) -> None:
    assert cpus.worker_cpus(index, workers, mask, quota) == expected


PINNING_SCRIPT = r"""
import json, os, sys, threading
from server.runtime import cpus

def mask_in_new_thread():
    seen = []
    thread = threading.Thread(target=lambda: seen.append(sorted(os.sched_getaffinity(0))))
    thread.start()
    thread.join()
    return seen[0]

full = sorted(os.sched_getaffinity(0))
early = threading.Event()
stop = threading.Event()
early_mask = []
def started_before():
    early.set()
    stop.wait()
    early_mask.append(sorted(os.sched_getaffinity(0)))
before = threading.Thread(target=started_before)
before.start()
early.wait()
cpus.share_among(2)
pinned = cpus.pin_worker(1, 2)
stop.set()
before.join()
result = {"full": full, "pinned": pinned, "main": sorted(os.sched_getaffinity(0)), "early": early_mask[0],
          "later": mask_in_new_thread(), "usable": cpus.usable_cpus(), "process": cpus.process_cpus(),
          "reported": cpus.pinned_cpus()}
with cpus.unpinned():
    result["inside_main"] = sorted(os.sched_getaffinity(0))
    result["inside_thread"] = mask_in_new_thread()
result["after_main"] = sorted(os.sched_getaffinity(0))
seen = []
def unpin_then_read():
    cpus.unpin_this_thread()
    seen.append(sorted(os.sched_getaffinity(0)))
thread = threading.Thread(target=unpin_then_read)
thread.start()
thread.join()
result["unpinned_thread"] = seen[0]
result["main_at_end"] = sorted(os.sched_getaffinity(0))

# A thread that names itself (as gRPC's do) is released; one that does not stays pinned.
import ctypes
named, plain, ready, done = [], [], threading.Barrier(3), threading.Event()
def park(rename, into):
    if rename:
        ctypes.CDLL(None).prctl(15, b"event_engine", 0, 0, 0)  # PR_SET_NAME
    ready.wait()
    done.wait()
    into.append(sorted(os.sched_getaffinity(0)))
threads = [threading.Thread(target=park, args=(True, named)), threading.Thread(target=park, args=(False, plain))]
for thread in threads:
    thread.start()
ready.wait()
result["released"] = cpus.release_named_threads()
done.set()
for thread in threads:
    thread.join()
result["named"], result["plain"] = named[0], plain[0]
result["main_after_release"] = sorted(os.sched_getaffinity(0))
print(json.dumps(result))
"""


@pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2 or (cpus.cgroup_cpus() or 2) < 2,
    reason="pinning two workers needs two CPUs and no cgroup quota under two",
)
@pytest.mark.skipif(shutil.which("taskset") is None, reason="taskset (util-linux) is not installed")
def test_a_pinned_worker_pins_every_thread_and_releases_what_it_must() -> None:
    """In a child process (pinning this one would pin the test run): worker 1 of 2 on the first two CPUs."""
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT

    two = sorted(os.sched_getaffinity(0))[:2]
    command = ["taskset", "-c", ",".join(map(str, two)), sys.executable, "-c", PINNING_SCRIPT]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=True)
    result = json.loads(out.stdout)
    assert result["full"] == two
    assert result["pinned"] == [two[1]] and result["reported"] == [two[1]]
    # Every thread: the caller, one started before the pinning, one started after.
    assert result["main"] == result["early"] == result["later"] == [two[1]]
    # The process may still use both CPUs; its models' share is one.
    assert result["usable"] == 2 and result["process"] == 1
    assert result["inside_main"] == result["inside_thread"] == two
    assert result["after_main"] == [two[1]]
    assert result["unpinned_thread"] == two and result["main_at_end"] == [two[1]]
    assert result["released"] == 1 and result["named"] == two
    assert result["plain"] == result["main_after_release"] == [two[1]]


def test_nothing_is_pinned_for_a_lone_process() -> None:
    assert cpus.pinned_cpus() is None
    assert cpus.release_named_threads() == 0
    with cpus.unpinned():  # a no-op
        assert cpus.pinned_cpus() is None
