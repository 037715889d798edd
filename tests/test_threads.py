"""TVM's thread pool runs one thread per physical core after ``import edgecomp`` (TVM's own default
on x86 is half the logical CPUs: one thread on a 2-vCPU VM without SMT), and a user's
``TVM_NUM_THREADS`` is kept."""

from __future__ import annotations

import os
import subprocess
import sys

from edgecomp.threads import physical_cores

PROBE = ("import edgecomp, tvm, os; from edgecomp.threads import user_tvm_threads; "
         "print(tvm.runtime.num_threads(), os.environ.get('TVM_NUM_THREADS'), user_tvm_threads())")


def _pool(env_extra: dict[str, str]) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120, check=True)
    n, var, user = out.stdout.split()
    return int(n), var, user


def test_pool_uses_every_physical_core():
    cores = physical_cores()
    assert 1 <= cores <= (os.cpu_count() or 1)
    # set by edgecomp, not the user's: emulated devices (qemu) keep their one thread
    assert _pool({}) == (cores, str(cores), "None")


def test_user_setting_is_kept():
    assert _pool({"TVM_NUM_THREADS": "1"}) == (1, "1", "1")
    assert _pool({"OMP_NUM_THREADS": "1"}) == (1, "None", "None")
