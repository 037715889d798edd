"""How many threads TVM's CPU thread pool runs: one per physical core this process may use.

TVM sizes its pool, once, at the first parallel kernel, from ``TVM_NUM_THREADS`` (then
``OMP_NUM_THREADS``); unset, it takes *half* of ``std::thread::hardware_concurrency()`` on x86,
assuming two hyper-threads per core. On a machine without SMT (most cloud VMs: this project's
2-vCPU build machine, one thread per core) that is half the cores: every parallel loop of a
bundle ran on one core while ONNX Runtime used both (MiniLM's 128x384x1536 matmul: 1.14 ms on
TVM's default pool, 0.57 ms with both cores; ORT 0.65 ms).

:func:`default_tvm_threads` sets ``TVM_NUM_THREADS`` to the physical cores when neither variable
is set; ``import edgecomp`` calls it, before any TVM kernel runs. Set ``TVM_NUM_THREADS``
yourself to choose (the emulated arm64 device pins its own to 1).
"""

from __future__ import annotations

import os
from pathlib import Path


def physical_cores() -> int:
    """Distinct physical cores among the CPUs this process may run on (Linux sysfs topology;
    elsewhere, or when sysfs does not say, every logical CPU counts)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add((topo.joinpath("physical_package_id").read_text().strip(),
                       topo.joinpath("core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores))


# Marks a TVM_NUM_THREADS that default_tvm_threads set (child processes inherit both), so that
# user_tvm_threads can tell it from the user's own.
_MARK = "EDGECOMP_DEFAULT_TVM_THREADS"


def default_tvm_threads() -> int:
    """Set ``TVM_NUM_THREADS`` to :func:`physical_cores` unless it or ``OMP_NUM_THREADS`` is
    set; returns the thread count TVM's pool will use (it reads the variable when first used)."""
    for name in ("TVM_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    n = physical_cores()
    os.environ["TVM_NUM_THREADS"] = os.environ[_MARK] = str(n)
    return n


def user_tvm_threads() -> str | None:
    """``TVM_NUM_THREADS`` as the user set it; None when unset or set by :func:`default_tvm_threads`.
    Emulated devices (qemu-user) run one thread unless the user asks for more: there the default
    schedules' parallel loops on TVM's thread pool did not finish in 300 s."""
    value = os.environ.get("TVM_NUM_THREADS")
    return None if value is None or os.environ.get(_MARK) == value else value
