"""Devices a bundle is checked on: this machine, a TVM RPC server, a tracker's farm, emulated arm64.

A device is named by a string (``edgecomp check --device``)::

    local                   this machine, in-process
    rpc://HOST:PORT         a TVM RPC server on the device (python -m tvm.exec.rpc_server)
    tracker://HOST:PORT/KEY a TVM RPC tracker; any free device registered under KEY
    emu-arm64[:CPU]         an emulated aarch64 Linux device on this machine (qemu-user), set up by
                            tools/setup_emu_arm64.sh; CPU is a qemu CPU (default: the bundle's core)

``with device:`` starts it (the emulator launches its RPC server under qemu, bound to 127.0.0.1)
and stops it (by process group, also on Ctrl-C and at interpreter exit); ``with device.connect()
as session:`` opens one session, whose ``load_module`` / ``tensor`` / ``dev`` are the same calls
for a local and a remote device. Nothing here waits without a bound: connecting probes the socket
with a timeout first, and ``session.guard(seconds, what)`` shuts the session's socket down when a
remote call runs past its deadline, so a hung or vanished device becomes a :class:`DeviceError`.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import json
import logging
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from edgecomp.errors import DeviceError, InputError
from edgecomp.targets.base import host_arch
from edgecomp.threads import user_tvm_threads

__all__ = [
    "Device",
    "Session",
    "LocalDevice",
    "RPCDevice",
    "TrackerDevice",
    "EmuArm64Device",
    "parse_device",
    "qemu_cpu_for",
    "emu_home",
    "emu_info",
]

log = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT = 20.0  # s: TCP connect, RPC handshake, a tracker finding a free device
DEFAULT_TIMEOUT = 600.0  # s: one whole session (upload, runs, timing)
DEFAULT_START_TIMEOUT = 120.0  # s: the emulated device's server start (measured ~6 s here)

# LLVM -mcpu → the qemu-aarch64 (7.2) CPU that emulates that core's ISA. A core qemu lacks maps to
# the nearest one that has every instruction it has (cortex-a55 → cortex-a76: both ARMv8.2 with
# dotprod and fp16); an unknown core gets "max". No -mcpu: cortex-a53, the oldest core the arm64
# target promises to run on, so code that needs more (e.g. built with +sve) fails the check.
QEMU_CPUS = {
    "cortex-a35": "cortex-a35",
    "cortex-a53": "cortex-a53",
    "cortex-a55": "cortex-a76",
    "cortex-a57": "cortex-a57",
    "cortex-a72": "cortex-a72",
    "cortex-a73": "cortex-a72",
    "cortex-a75": "cortex-a76",
    "cortex-a76": "cortex-a76",
    "cortex-a77": "cortex-a76",
    "neoverse-n1": "neoverse-n1",
    "a64fx": "a64fx",
}
DEFAULT_QEMU_CPU = "cortex-a53"
_QEMU_CPU_NAMES = set(QEMU_CPUS.values()) | {"max"}


def qemu_cpu_for(tvm_target: dict[str, Any] | None) -> str:
    """The qemu CPU that emulates the core a bundle's TVM target was built for."""
    mcpu = (tvm_target or {}).get("mcpu")
    if not mcpu or mcpu == "generic":
        return DEFAULT_QEMU_CPU
    return QEMU_CPUS.get(str(mcpu).lower(), "max")


# ---------------------------------------------------------------------------------------------
# bounded waits on sockets the TVM runtime (C++) owns


def _socket_inodes() -> dict[int, str]:
    """fd → 'socket:[inode]' for every socket this process has open (Linux; {} elsewhere)."""
    out = {}
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return out
    for name in fds:
        try:
            link = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if link.startswith("socket:"):
            out[int(name)] = link
    return out


def _peer(fd: int) -> tuple | None:
    try:
        s = socket.socket(fileno=os.dup(fd))
    except OSError:
        return None
    try:
        return s.getpeername()
    except OSError:
        return None
    finally:
        s.close()


def _shutdown(fd: int, inode: str) -> None:
    """Shut a socket down (both ways) if ``fd`` is still that socket: blocked reads return at once."""
    try:
        if os.readlink(f"/proc/self/fd/{fd}") != inode:
            return
        s = socket.socket(fileno=os.dup(fd))
    except OSError:
        return
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        s.close()


def _new_sockets_to(before: dict[int, str], addr: tuple[str, int]) -> dict[int, str]:
    """Sockets opened since ``before`` whose peer is ``addr`` (host, port)."""
    host, port = addr
    try:
        ips = {ai[4][0] for ai in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)}
    except OSError:
        ips = {host}
    found = {}
    for fd, inode in _socket_inodes().items():
        if before.get(fd) == inode:
            continue
        peer = _peer(fd)
        if peer and peer[1] == port and peer[0] in ips:
            found[fd] = inode
    return found


def _probe(host: str, port: int, timeout: float, what: str) -> None:
    """Fail fast and bounded when nothing listens at host:port (the TVM client would retry or block)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except socket.timeout:
        raise DeviceError(f"{what}: no answer from {host}:{port} within {timeout:g} s (device unreachable)") from None
    except OSError as err:
        raise DeviceError(f"{what}: cannot connect to {host}:{port}: {err.strerror or err} (device unreachable)") from None


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    # TVM errors end with the useful line ("Check failed: ...: Failed to load ..."); tracebacks start first.
    useful = [ln for ln in lines if not ln.startswith(("File ", "Traceback", "^"))]
    text = (useful[-1] if useful else type(err).__name__)[:300]
    return text


class _Watchdog:
    """Runs ``on_fire`` once if a ``with`` block outlives its deadline (see ``Session.guard``)."""

    def __init__(self, seconds: float, on_fire) -> None:
        self.fired = False
        self._timer = threading.Timer(seconds, self._fire, args=(on_fire,))
        self._timer.daemon = True

    def _fire(self, on_fire) -> None:
        self.fired = True
        try:
            on_fire()
        except Exception:  # noqa: BLE001  (best effort: the caller reports the timeout)
            log.debug("watchdog action failed", exc_info=True)

    def __enter__(self) -> _Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()


# ---------------------------------------------------------------------------------------------
# sessions


class Session:
    """One open connection to a device: load code, place tensors, call functions."""

    def __init__(self, device: Device, remote=None, sockets: dict[int, str] | None = None, timeout: float = DEFAULT_TIMEOUT):
        import tvm

        self.device = device
        self.remote = remote
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self._sockets = sockets or {}
        self.dev = remote.cpu() if remote is not None else tvm.cpu()
        self._uploaded = 0

    @property
    def is_remote(self) -> bool:
        return self.remote is not None

    def load_module(self, path: str | os.PathLike):
        """Load a compiled library on the device (uploading it first when the device is remote)."""
        from edgecomp.targets.lowering import elf_arch

        path = Path(path)
        if self.remote is None:
            import tvm

            arch = elf_arch(path)
            if arch is not None and arch != host_arch():
                raise DeviceError(f"{self.device.spec}: {path.name} is {arch} code; this machine is {host_arch()} and cannot load it")
            with self.guard("loading the code"):
                return tvm.runtime.load_module(str(path))
        self._uploaded += 1
        name = f"edgecomp-{os.getpid()}-{self._uploaded}{path.suffix}"
        with self.guard(f"uploading {path.name}"):
            self.remote.upload(str(path), target=name)
        try:
            with self.guard(f"loading {path.name}"):
                return self.remote.load_module(name)
        except DeviceError as err:
            arch, dev_arch = elf_arch(path), self.device.arch
            if arch is not None and dev_arch is not None and arch != dev_arch:
                raise DeviceError(f"{err} ({path.name} is {arch} code; the device is {dev_arch})") from None
            if arch is not None and dev_arch is None:
                raise DeviceError(f"{err} ({path.name} is {arch} code: is the device {arch}?)") from None
            raise

    def tensor(self, array):
        import numpy as np
        import tvm

        with self.guard("copying a tensor to the device"):
            return tvm.runtime.tensor(np.ascontiguousarray(array), device=self.dev)

    def function(self, name: str):
        """A global function of the device (None when the device does not provide it)."""
        import tvm_ffi

        try:
            if self.remote is None:
                return tvm_ffi.get_global_func(name, allow_missing=True)
            with self.guard(f"looking up {name}"):
                return self.remote.get_function(name)
        except DeviceError:
            raise
        except Exception:  # noqa: BLE001  (a stock server lacks edgecomp's functions)
            return None

    def info(self) -> dict[str, Any]:
        """What the device says about itself (machine, TVM, threads), as far as it says."""
        out: dict[str, Any] = {}
        f = self.function("edgecomp.device.info")
        if f is not None:
            with self.guard("querying the device"):
                out.update(json.loads(str(f())))
        if "threads" not in out:
            n = self.function("runtime.NumThreads")
            if n is not None:
                with self.guard("querying the device"):
                    out["threads"] = int(n())
        return out

    def memory(self) -> dict[str, Any] | None:
        """Peak and current RSS of the process that runs the model, where the device reports it."""
        if self.remote is None:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
            return {"peak_rss_bytes": int(peak), "scope": "this Python process (includes ONNX Runtime and the TVM compiler)"}
        f = self.function("edgecomp.device.memory")
        if f is None:
            return None
        with self.guard("querying memory"):
            st = json.loads(str(f()))
        if "VmHWM" not in st:
            return None
        return {"peak_rss_bytes": st["VmHWM"], "rss_bytes": st.get("VmRSS"), "scope": self.device.memory_scope}

    @contextlib.contextmanager
    def guard(self, what: str, seconds: float | None = None) -> Iterator[None]:
        """Bound a device call: past the deadline the connection is cut and DeviceError raised.

        Any failure of the device (connection dropped, remote error) also becomes a DeviceError
        that names the device and what was being done.
        """
        if seconds is None:
            seconds = max(0.5, self.deadline - time.monotonic())
        late = f"{self.device.spec}: no answer while {what}: the session ran past its {self.timeout:g} s timeout (--timeout); connection closed"
        wd = _Watchdog(seconds, self._cut) if self.remote is not None else contextlib.nullcontext()
        try:
            with wd:
                yield
        except (DeviceError, InputError, KeyboardInterrupt, SystemExit):
            raise
        except (TypeError, AttributeError, NameError):  # our bugs, not the device's
            raise
        except Exception as err:  # noqa: BLE001  (TVM raises its own error types from the C++ side)
            if getattr(wd, "fired", False):
                raise DeviceError(late) from None
            text = _first_line(err)
            lost = bool(re.search(r"kShutdown|closed|reset|Broken pipe|EOF|socket", text))
            if lost:
                text = "the connection to the device was lost"
            raise DeviceError(f"{self.device.spec}: failed while {what}: {text}{self.device.diagnose(wait=lost)}") from None
        if getattr(wd, "fired", False):
            raise DeviceError(late)

    def _cut(self) -> None:
        for fd, inode in self._sockets.items():
            _shutdown(fd, inode)
        self.device._on_hang()

    def close(self) -> None:
        """Drop the connection (the server's session ends with it)."""
        if self.remote is None:
            return
        self.remote = None
        self.dev = None
        gc.collect()  # the RPC session lives as long as any remote object: let them go first
        for fd, inode in self._sockets.items():
            _shutdown(fd, inode)
        self._sockets = {}

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# devices


class Device:
    """A place to run bundles. ``with device:`` starts/stops it; ``device.connect()`` opens a session."""

    kind = "device"
    emulated = False
    memory_scope = "the device process that runs the model"

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.started = False
        self.connect_timeout = DEFAULT_CONNECT_TIMEOUT
        self.timeout = DEFAULT_TIMEOUT

    @property
    def arch(self) -> str | None:
        """CPU architecture of the device when known before connecting."""
        return None

    def start(self, wait: bool = True) -> None:
        self.started = True

    def wait_ready(self) -> None:
        """Block until a device started with ``start(wait=False)`` accepts connections."""

    def stop(self) -> None:
        self.started = False

    def connect(self) -> Session:
        raise NotImplementedError

    def diagnose(self, wait: bool = False) -> str:
        """Extra context for an error message (e.g. how the emulated device's session died)."""
        return ""

    def _on_hang(self) -> None:
        """Called from the watchdog thread when a session call ran past its deadline."""

    def describe(self) -> dict[str, Any]:
        return {"spec": self.spec, "kind": self.kind, "arch": self.arch, "emulated": self.emulated}

    def __enter__(self) -> Device:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec}>"


class LocalDevice(Device):
    """This machine, in-process (``tvm.cpu()``)."""

    kind = "local"
    memory_scope = "this Python process"

    def __init__(self) -> None:
        super().__init__("local")

    @property
    def arch(self) -> str:
        return host_arch()

    def connect(self) -> Session:
        return Session(self, timeout=self.timeout)


class RPCDevice(Device):
    """A TVM RPC server on the device (``python -m tvm.exec.rpc_server --host 0.0.0.0 --port 9090``)."""

    kind = "rpc"

    def __init__(self, host: str, port: int, key: str = "", spec: str | None = None) -> None:
        super().__init__(spec or f"rpc://{host}:{port}")
        self.host, self.port, self.key = host, port, key

    def _endpoint(self) -> tuple[str, int, str]:
        return self.host, self.port, self.key

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "endpoint": f"{self.host}:{self.port}" if self.port else None}

    def connect(self) -> Session:
        from tvm import rpc

        host, port, key = self._endpoint()
        if self.kind != "tracker":  # a server behind a tracker takes a bare probe for a lost tracker and re-keys
            _probe(host, port, self.connect_timeout, self.spec)
        before = _socket_inodes()
        wd = _Watchdog(self.connect_timeout, lambda: [_shutdown(fd, i) for fd, i in _new_sockets_to(before, (host, port)).items()])
        try:
            with wd:
                remote = rpc.connect(host, port, key=key, session_timeout=int(self.timeout) + 30)
        except Exception as err:  # noqa: BLE001
            if wd.fired:
                raise DeviceError(f"{self.spec}: {host}:{port} accepted the connection but did not complete the TVM RPC "
                                  f"handshake within {self.connect_timeout:g} s (not a TVM RPC server, or busy)") from None
            raise DeviceError(f"{self.spec}: TVM RPC connection to {host}:{port} failed: {_first_line(err)}") from None
        if wd.fired:  # the handshake finished just as the deadline passed: the socket is cut
            raise DeviceError(f"{self.spec}: the TVM RPC handshake with {host}:{port} took over {self.connect_timeout:g} s")
        return Session(self, remote, _new_sockets_to(before, (host, port)), timeout=self.timeout)


def _require_key(sock: socket.socket, key: str, what: str) -> None:
    """Ask a connected tracker for its summary; a clear error if no device is registered under ``key``."""
    from tvm.rpc import base

    base.sendjson(sock, [base.TrackerCode.SUMMARY])
    summary = base.recvjson(sock)
    queue = (summary[1] if summary and summary[0] == base.TrackerCode.SUCCESS else {}).get("queue_info", {})
    if key not in queue:
        known = ", ".join(sorted(queue)) or "none"
        raise DeviceError(f"{what}: no device is registered with the tracker under key {key!r} (keys: {known})")


def check_tracker_key(host: str, port: int, key: str, timeout: float, what: str) -> None:
    """Bounded check that a TVM RPC tracker answers at host:port and has devices under ``key``."""
    from tvm.rpc import base

    _probe(host, port, timeout, what)
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
            if struct.unpack("<i", base.recvall(sock, 4))[0] != base.RPC_TRACKER_MAGIC:
                raise DeviceError(f"{what}: {host}:{port} is not a TVM RPC tracker")
            _require_key(sock, key, what)
    except socket.timeout:
        raise DeviceError(f"{what}: the tracker at {host}:{port} did not answer within {timeout:g} s") from None
    except (OSError, ValueError, struct.error) as err:
        raise DeviceError(f"{what}: talking to the tracker failed: {err}") from None


class TrackerDevice(RPCDevice):
    """Any free device registered under ``key`` with a TVM RPC tracker (``python -m tvm.exec.rpc_tracker``)."""

    kind = "tracker"

    def __init__(self, host: str, port: int, key: str) -> None:
        super().__init__(host, port, key, spec=f"tracker://{host}:{port}/{key}")
        self.tracker = (host, port)
        self.device_key = key

    def _endpoint(self) -> tuple[str, int, str]:
        """Ask the tracker for a free device under our key (bounded: connect_timeout)."""
        from tvm.rpc import base

        host, port = self.tracker
        _probe(host, port, self.connect_timeout, self.spec)
        try:
            with socket.create_connection(self.tracker, timeout=self.connect_timeout) as sock:
                sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
                magic = struct.unpack("<i", base.recvall(sock, 4))[0]
                if magic != base.RPC_TRACKER_MAGIC:
                    raise DeviceError(f"{self.spec}: {host}:{port} is not a TVM RPC tracker")
                _require_key(sock, self.device_key, self.spec)
                base.sendjson(sock, [base.TrackerCode.REQUEST, self.device_key, "", 1])
                value = base.recvjson(sock)
        except socket.timeout:
            raise DeviceError(f"{self.spec}: the tracker found no free device under key {self.device_key!r} "
                              f"within {self.connect_timeout:g} s") from None
        except (OSError, ValueError, struct.error) as err:
            raise DeviceError(f"{self.spec}: talking to the tracker failed: {err}") from None
        if not value or value[0] != base.TrackerCode.SUCCESS:
            raise DeviceError(f"{self.spec}: the tracker refused the request: {value}")
        url, dport, matchkey = value[1]
        self.host, self.port = url, int(dport)
        return url, int(dport), matchkey


def emu_home() -> Path:
    return Path(os.environ.get("EDGECOMP_EMU_HOME") or Path.home() / ".cache" / "edgecomp" / "emu-arm64")


SETUP_HINT = "run 'bash tools/setup_emu_arm64.sh' (apt + PyPI, about 40 s)"


def emu_info() -> dict[str, Any]:
    """The emulated device's set-up record (written by tools/setup_emu_arm64.sh), checked."""
    path = emu_home() / "emu.json"
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise DeviceError(f"emu-arm64 is not set up ({path} is missing): {SETUP_HINT}") from None
    except (OSError, ValueError) as err:
        raise DeviceError(f"emu-arm64: cannot read {path}: {err}; {SETUP_HINT}") from None
    python = Path(info.get("sysroot", "")) / info.get("python", "")
    for what, p in (("qemu-aarch64", info.get("qemu") or ""), ("the arm64 Python", str(python)), ("the device's packages", info.get("site") or "")):
        if not p or not Path(p).exists():
            raise DeviceError(f"emu-arm64: {what} ({p or 'unset'}) is missing; {SETUP_HINT}")
    return info


# Emulated devices alive in this process: stopped at interpreter exit whatever happens.
_LIVE: set[EmuArm64Device] = set()


@atexit.register
def _stop_all() -> None:
    for d in list(_LIVE):
        d.stop()


class EmuArm64Device(RPCDevice):
    """An emulated aarch64 Linux device: the TVM runtime in an arm64 Python under qemu-aarch64.

    The RPC server (``device_server.py``) runs under ``qemu-aarch64 -cpu CPU`` in its own process
    group, bound to 127.0.0.1 on a free port; :meth:`stop` kills that group by its id. Latency
    measured here is emulated (10–20x native, noisy): reported, labelled, never a speed claim.
    """

    kind = "emu-arm64"
    emulated = True
    memory_scope = "the emulated session process (qemu-aarch64, including the emulator)"

    def __init__(self, cpu: str | None = None) -> None:
        if cpu is not None and cpu not in _QEMU_CPU_NAMES:
            raise InputError(f"emu-arm64: unknown qemu CPU {cpu!r} (known: {', '.join(sorted(_QEMU_CPU_NAMES))})")
        super().__init__("127.0.0.1", 0, spec="emu-arm64" + (f":{cpu}" if cpu else ""))
        self.cpu = cpu
        self.proc: subprocess.Popen | None = None
        self.start_timeout = DEFAULT_START_TIMEOUT
        self.start_seconds: float | None = None
        self._log: Path | None = None
        self._tmp: Path | None = None
        self._stop_lock = threading.Lock()  # the watchdog's stop() and the caller's may race: the second waits
        self._t0 = 0.0

    @property
    def arch(self) -> str:
        return "aarch64"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def for_target(self, tvm_target: dict[str, Any] | None) -> None:
        """Emulate the core the bundle was built for, unless a CPU was named (``emu-arm64:CPU``)."""
        if self.proc is None and self.cpu is None:
            self.cpu = qemu_cpu_for(tvm_target)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update({"qemu_cpu": self.cpu or DEFAULT_QEMU_CPU, "server_pid": self.pid, "port": self.port or None,
                  "server_start_s": self.start_seconds})
        return d

    def start(self, wait: bool = True) -> None:
        """Launch the device's RPC server; with ``wait=False`` return at once (see :meth:`wait_ready`)."""
        if self.proc is not None and self.proc.poll() is None:
            if wait:
                self.wait_ready()
            return
        info = emu_info()
        cpu = self.cpu or DEFAULT_QEMU_CPU
        sysroot = info["sysroot"]
        server = Path(__file__).with_name("device_server.py")
        cmd = [info["qemu"], "-cpu", cpu, "-L", sysroot, str(Path(sysroot) / info["python"]), str(server),
               "--host", "127.0.0.1", "--port", "0", "--watch-parent", "--own-tmpdir"]
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/tmp"),
            "LANG": "C.UTF-8",
            "PYTHONPATH": info["site"],
            "PYTHONNOUSERSITE": "1",
            "TVM_USE_RUNTIME_LIB": "1",  # runtime only: import 27 s → 10 s under qemu
            "EDGECOMP_QEMU_CPU": cpu,
        }
        # One TVM thread unless asked otherwise: threads under qemu only add noise (p90 2x the median).
        env["TVM_NUM_THREADS"] = user_tvm_threads() or "1"
        # The device's own temp folder (uploaded code, session folders, the server log): removed by stop().
        self._tmp = Path(tempfile.mkdtemp(prefix="edgecomp-emu-arm64-"))
        env["TMPDIR"] = str(self._tmp)
        self._log = self._tmp / "server.log"
        fd = os.open(self._log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        t0 = time.monotonic()
        try:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=fd,
                                         env=env, start_new_session=True)
        except OSError as err:
            os.close(fd)
            raise DeviceError(f"emu-arm64: cannot start qemu-aarch64: {err}; {SETUP_HINT}") from None
        os.close(fd)
        _LIVE.add(self)
        self.cpu = cpu
        self._t0 = t0
        self.port = 0
        self.started = True
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Wait (bounded by ``start_timeout``) until the server accepts connections."""
        if self.port:
            return
        try:
            self.port = self._wait_ready(self._t0)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - self._t0
        log.info("emu-arm64: server pid %d on 127.0.0.1:%d (cpu %s) started in %.1f s", self.proc.pid, self.port, self.cpu, self.start_seconds)

    def _wait_ready(self, t0: float) -> int:
        assert self.proc is not None and self.proc.stdout is not None
        out = self.proc.stdout
        buf = b""
        while True:
            left = self.start_timeout - (time.monotonic() - t0)
            if left <= 0:
                raise DeviceError(f"emu-arm64: the device's RPC server did not start within {self.start_timeout:g} s{self.diagnose()}")
            ready, _, _ = select.select([out], [], [], min(left, 0.5))
            if ready:
                chunk = os.read(out.fileno(), 4096)
                if not chunk:
                    self.proc.wait(timeout=5)
                    raise DeviceError(f"emu-arm64: the device's RPC server exited with code {self.proc.returncode} "
                                      f"before it was ready{self.diagnose()}")
                buf += chunk
                m = re.search(rb"EDGECOMP-DEVICE-SERVER READY port=(\d+)", buf)
                if m:
                    return int(m.group(1))
            elif self.proc.poll() is not None:
                raise DeviceError(f"emu-arm64: the device's RPC server exited with code {self.proc.returncode} "
                                  f"before it was ready{self.diagnose()}")

    def connect(self) -> Session:
        if self.proc is None:
            raise DeviceError("emu-arm64: the device is not started (use it as 'with device:')")
        self.wait_ready()
        if self.proc.poll() is not None:
            raise DeviceError(f"emu-arm64: the device's RPC server (pid {self.proc.pid}) is gone (exit code {self.proc.returncode}){self.diagnose()}")
        return super().connect()

    def diagnose(self, wait: bool = False) -> str:
        """How the emulated session ended, from the server's log (e.g. SIGILL: wrong ISA).

        ``wait``: the connection just dropped; give the server a moment to reap the session.
        """
        if self._log is None:
            return ""
        t_end = time.monotonic() + (2.0 if wait and self.proc is not None else 0.0)
        while True:
            try:
                lines = [ln for ln in self._log.read_text(errors="replace").splitlines() if ln.strip()]
            except OSError:
                return ""
            if any("died of signal" in ln for ln in lines[-20:]) or time.monotonic() >= t_end or (self.proc and self.proc.poll() is not None):
                break
            time.sleep(0.1)
        for ln in reversed(lines[-20:]):
            m = re.search(r"died of signal (\d+)", ln)
            if m:
                sig = int(m.group(1))
                name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else f"signal {sig}"
                if sig == signal.SIGILL:
                    return (f" (the device's session died of {name}: an illegal instruction; the code needs an ISA "
                            f"the emulated {self.cpu} lacks)")
                return f" (the device's session died of {name})"
        if self.proc is not None and self.proc.poll() is not None and lines:
            return f" (server log: {lines[-1][:200]})"
        return ""

    def _on_hang(self) -> None:
        self.stop()

    def stop(self) -> None:
        """Kill the server's process group (server and session) by its id, then reap it."""
        with self._stop_lock:
            self._stop()

    def _stop(self) -> None:
        proc, self.proc = self.proc, None
        self.started = False
        _LIVE.discard(self)
        if proc is None:
            return
        for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
                if sig == signal.SIGTERM:  # a stopped (hung) process acts on SIGTERM only once continued
                    os.killpg(proc.pid, signal.SIGCONT)
            except ProcessLookupError:
                break
            except PermissionError:
                proc.kill()
            try:
                proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
            # the session child (same group) may outlive the server for a moment
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            break
        _wait_group_gone(proc.pid, 5.0)
        if proc.stdout is not None:
            proc.stdout.close()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
            self._log = None

    def __del__(self) -> None:
        if getattr(self, "proc", None) is not None:
            self.stop()


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``, from /proc (empty where /proc is missing)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            pids.append(int(stat.parent.name))
    return pids


def _wait_group_gone(pgid: int, timeout: float) -> None:
    """Block until a killed process group has really exited (qemu takes a moment to die after SIGKILL)."""
    t_end = time.monotonic() + timeout
    while _group_members(pgid) and time.monotonic() < t_end:
        time.sleep(0.02)


_RPC = re.compile(r"^rpc://(?P<host>\[[^\]]+\]|[^:/]+):(?P<port>\d+)/?$")
_TRACKER = re.compile(r"^tracker://(?P<host>\[[^\]]+\]|[^:/]+):(?P<port>\d+)/(?P<key>[^/\s]+)$")


def parse_device(spec: str | Device) -> Device:
    """A device from its name: ``local``, ``rpc://HOST:PORT``, ``tracker://HOST:PORT/KEY``, ``emu-arm64[:CPU]``."""
    if isinstance(spec, Device):
        return spec
    s = str(spec).strip()
    if s == "local":
        return LocalDevice()
    if s == "emu-arm64" or s.startswith("emu-arm64:"):
        return EmuArm64Device(s.split(":", 1)[1] if ":" in s else None)
    for pattern, cls in ((_RPC, RPCDevice), (_TRACKER, TrackerDevice)):
        m = pattern.match(s)
        if m:
            port = int(m["port"])
            if not 0 < port < 65536:
                raise InputError(f"device {s!r}: port {port} is out of range")
            host = m["host"].strip("[]")
            return cls(host, port, m["key"]) if cls is TrackerDevice else cls(host, port)
    raise InputError(
        f"unknown device {s!r} (use local, emu-arm64, rpc://HOST:PORT or tracker://HOST:PORT/KEY)"
    )
