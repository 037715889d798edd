"""A TVM RPC server for one device, in one process: what ``emu-arm64`` runs under qemu-aarch64.

Run on the device with its own Python and the TVM runtime (it needs ``tvm`` only, not edgecomp)::

    python3 device_server.py --host 127.0.0.1 --port 0

Why not ``python -m tvm.exec.rpc_server``: that one re-executes the interpreter (multiprocessing
"spawn"), which fails under qemu-user without binfmt_misc, and it stops serving for good when a
session dies (a model built for the wrong ISA kills the session with SIGILL). This server speaks
the same protocol (any TVM RPC client connects to it) and:

* binds the given address (port 0: any free port) and prints one line, ``EDGECOMP-DEVICE-SERVER
  READY port=N pid=P``, when it accepts connections;
* serves each session in a forked child (same process group), so a crashing model ends only that
  session, and honours the client's ``-timeout=`` (the session is killed when it runs past it);
* exits, taking its process group with it, when its parent process goes away (nothing is left
  behind when the program that started it is killed);
* registers ``edgecomp.device.info`` and ``edgecomp.device.memory`` (machine, TVM version, threads;
  the session process's peak RSS from /proc) for the client to query.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import struct
import sys
import select
import tempfile
import time

READY = "EDGECOMP-DEVICE-SERVER READY"


def _proc_status() -> dict[str, int]:
    """VmRSS / VmHWM of this process in bytes (Linux /proc; empty elsewhere)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


def _register_functions(workdir: str) -> None:
    import tvm
    import tvm_ffi

    @tvm_ffi.register_global_func("tvm.rpc.server.workpath", override=True)
    def _workpath(name):
        return os.path.join(workdir, name)

    @tvm_ffi.register_global_func("tvm.rpc.server.load_module", override=True)
    def _load_module(name):
        return tvm.runtime.load_module(os.path.join(workdir, name))

    @tvm_ffi.register_global_func("edgecomp.device.info", override=True)
    def _info():
        return json.dumps(
            {
                "machine": platform.machine(),
                "system": platform.system(),
                "python": platform.python_version(),
                "tvm": tvm.__version__,
                "threads": int(tvm.runtime.num_threads()),
                "cpu_count": os.cpu_count(),
                "qemu_cpu": os.environ.get("EDGECOMP_QEMU_CPU"),
                "server": "edgecomp device_server",
            }
        )

    @tvm_ffi.register_global_func("edgecomp.device.memory", override=True)
    def _memory():
        return json.dumps(_proc_status())


def _handshake(conn: socket.socket, key: str) -> dict | None:
    """The TVM RPC handshake (server side); returns the client's options or None to drop it."""
    from tvm.rpc import base

    conn.settimeout(30)
    magic = struct.unpack("<i", base.recvall(conn, 4))[0]
    if magic != base.RPC_MAGIC:
        return None
    keylen = struct.unpack("<i", base.recvall(conn, 4))[0]
    if not 0 < keylen < 4096:
        return None
    words = base.recvall(conn, keylen).decode("utf-8").split()
    if not words or words[0] != "client:" + key:
        conn.sendall(struct.pack("<i", base.RPC_CODE_MISMATCH))
        return None
    conn.sendall(struct.pack("<i", base.RPC_CODE_SUCCESS))
    server_key = ("server:" + key).encode("utf-8")
    conn.sendall(struct.pack("<i", len(server_key)))
    conn.sendall(server_key)
    conn.settimeout(None)
    opts = {}
    for w in words[1:]:
        if w.startswith("-timeout="):
            opts["timeout"] = float(w[len("-timeout="):])
    return opts


def _serve_session(conn: socket.socket, opts: dict, log, parent: int | None) -> None:
    import tvm_ffi

    workdir = tempfile.mkdtemp(prefix="edgecomp-device-")
    pid = os.fork()
    if pid == 0:  # the session: serve until the client hangs up
        code = 0
        try:
            _register_functions(workdir)
            tvm_ffi.get_global_func("rpc.ServerLoop")(conn.fileno())
        except BaseException as err:  # noqa: BLE001  (report, then leave without running atexit hooks)
            log(f"session error: {type(err).__name__}: {err}")
            code = 1
        finally:
            os._exit(code)
    conn.close()
    deadline = time.monotonic() + opts["timeout"] if opts.get("timeout") else None
    try:
        while True:
            _orphaned(parent)
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                if os.WIFSIGNALED(status):
                    log(f"session {pid} died of signal {os.WTERMSIG(status)}")
                break
            if deadline is not None and time.monotonic() > deadline:
                log(f"session {pid} ran past its {opts['timeout']} s timeout; killed")
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                break
            time.sleep(0.05)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


_OWN_TMPDIR: str | None = None  # --own-tmpdir: this folder is the device's; removed when orphaned


def _orphaned(parent: int | None) -> None:
    """Take the whole process group down when the program that started the server is gone.

    Checked from the accept loop, not a thread: a process that forks must stay single-threaded
    (qemu-user aborts when a child forked from a threaded process starts threads of its own).
    """
    if parent is not None and os.getppid() != parent:
        try:
            if _OWN_TMPDIR:
                shutil.rmtree(_OWN_TMPDIR, ignore_errors=True)
            os.killpg(os.getpgrp(), signal.SIGKILL)
        finally:
            os._exit(1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=9090, help="port to bind; 0: any free port")
    ap.add_argument("--key", default="", help="RPC key clients must present (default: none)")
    ap.add_argument("--watch-parent", action="store_true", help="exit when the parent process exits")
    ap.add_argument("--own-tmpdir", action="store_true", help="$TMPDIR is this server's: remove it when orphaned")
    args = ap.parse_args(argv)
    global _OWN_TMPDIR
    _OWN_TMPDIR = tempfile.gettempdir() if args.own_tmpdir else None

    def log(msg: str) -> None:
        print(f"device-server: {msg}", file=sys.stderr, flush=True)

    import tvm  # noqa: F401  (import before forking sessions: each session starts warm)

    parent = os.getppid() if args.watch_parent else None
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(1)
    print(f"{READY} port={sock.getsockname()[1]} pid={os.getpid()}", flush=True)
    while True:
        _orphaned(parent)
        if not select.select([sock], [], [], 0.5)[0]:
            continue
        conn, addr = sock.accept()
        try:
            opts = _handshake(conn, args.key)
        except (OSError, struct.error) as err:
            if str(err) != "connection reset":  # a bare probe of the port (connect, close) is not worth a line
                log(f"handshake with {addr} failed: {err}")
            opts = None
        if opts is None:
            conn.close()
            continue
        _serve_session(conn, opts, log, parent)


if __name__ == "__main__":
    sys.exit(main())
