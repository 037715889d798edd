#!/usr/bin/env bash
# Set up the emulated arm64 device (`edgecomp check --device emu-arm64`) unattended, from apt + PyPI.
#
#   apt  qemu-user            qemu-aarch64, the user-mode emulator: runs aarch64 Linux programs on
#                             this machine's kernel (no VM, no disk image, no binfmt_misc needed:
#                             edgecomp starts `qemu-aarch64 -L SYSROOT SYSROOT/usr/bin/python3.11`)
#   apt  arm64 .debs          python3.11-minimal, libpython3.11-stdlib, libstdc++6 and everything they
#                             depend on (libc6, libssl3, libffi8, ...), resolved by apt-cache for the
#                             arm64 architecture (`dpkg --add-architecture arm64` first) and unpacked
#                             with `dpkg -x` into a private sysroot: nothing arm64 is installed into
#                             this system, so the host's packages are untouched.
#   pip  aarch64 wheels       apache-tvm (same version as the host's, so the RPC protocol matches),
#                             apache-tvm-ffi==0.1.14.post0 (the project's pin), numpy, typing_extensions,
#                             psutil, unzipped onto the device's PYTHONPATH. libtvm_compiler.so (240 MB)
#                             is left out: the device runs TVM_USE_RUNTIME_LIB=1 (runtime only; the
#                             host compiles).
#
# Everything lands in ${EDGECOMP_EMU_HOME:-$HOME/.cache/edgecomp/emu-arm64}; emu.json there tells
# edgecomp where things are. Idempotent: a rerun only checks that the device works.
# Needs root (or sudo) only for apt; about 40 s and 150 MB on a fresh Debian 12 machine.
set -euo pipefail
cd "$(dirname "$0")/.."

EMU_HOME="${EDGECOMP_EMU_HOME:-$HOME/.cache/edgecomp/emu-arm64}"
PYTHON="${PYTHON:-python3}"
PYVER=3.11
TVM_FFI_PIN="0.1.14.post0"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
t0=$SECONDS
say() { echo "setup-emu-arm64: $*"; }

# The device is checked by running its Python under qemu and importing the TVM runtime there.
device_works() {
  [ -f "$EMU_HOME/emu.json" ] || return 1
  command -v qemu-aarch64 >/dev/null 2>&1 || return 1
  TVM_USE_RUNTIME_LIB=1 PYTHONPATH="$EMU_HOME/site" PYTHONNOUSERSITE=1 \
    timeout 120 qemu-aarch64 -cpu cortex-a53 -L "$EMU_HOME/sysroot" "$EMU_HOME/sysroot/usr/bin/python$PYVER" \
    -c "import platform, tvm, tvm.rpc; assert platform.machine() == 'aarch64'; print(tvm.__version__)" 2>/dev/null
}

host_tvm="$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("apache-tvm"))' 2>/dev/null || true)"
if version=$(device_works); then
  if [ -z "$host_tvm" ] || [ "$version" = "$host_tvm" ]; then
    say "already set up in $EMU_HOME (device Python imports TVM $version under qemu-aarch64); nothing to do"
    exit 0
  fi
  say "the device has TVM $version but this machine has $host_tvm (the RPC protocol must match): setting up again"
fi

# 1. apt: qemu-user on the host, and the arm64 architecture so apt can resolve arm64 .debs.
if ! command -v qemu-aarch64 >/dev/null 2>&1; then
  say "installing qemu-user (apt)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends qemu-user >/dev/null
fi
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  say "adding the arm64 architecture to dpkg (downloads only; nothing arm64 gets installed)"
  $SUDO dpkg --add-architecture arm64
  $SUDO apt-get update -qq
elif ! apt-cache show "python$PYVER-minimal:arm64" >/dev/null 2>&1; then
  $SUDO apt-get update -qq
fi

mkdir -p "$(dirname "$EMU_HOME")"
stage="$(mktemp -d "${EMU_HOME%/}.tmp-XXXXXX")"
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/debs" "$stage/sysroot" "$stage/wheels" "$stage/site"

# 2. the arm64 Python sysroot: the closure of Depends (no Recommends) of the interpreter, its
#    standard library and libstdc++ (the TVM runtime is C++), limited to arm64 packages.
#    dpkg/tar/install-info are package-management tools the sysroot never runs.
roots=("python$PYVER-minimal:arm64" "libpython$PYVER-stdlib:arm64" "libstdc++6:arm64")
mapfile -t debs < <(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
    --no-replaces --no-enhances --no-pre-depends "${roots[@]}" 2>/dev/null \
  | grep -E '^[a-z0-9][a-z0-9.+-]*:arm64$' | grep -vE '^(dpkg|tar|install-info):' | sort -u)
say "downloading ${#debs[@]} arm64 .debs (python$PYVER and its libraries)"
(cd "$stage/debs" && apt-get download -qq "${debs[@]}" 2>/dev/null) || (cd "$stage/debs" && apt-get download "${debs[@]}")
say "unpacking them into the sysroot (dpkg -x)"
for deb in "$stage"/debs/*.deb; do dpkg -x "$deb" "$stage/sysroot"; done
rm -rf "$stage/debs"

# 3. aarch64 wheels from PyPI, same TVM as the host (its RPC client talks to the device's server).
case "$host_tvm" in 0.27.*) tvm_req="apache-tvm==$host_tvm" ;; *) tvm_req="apache-tvm==0.27.*" ;; esac
numpy_version="$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("numpy"))' 2>/dev/null || true)"
numpy_req="numpy${numpy_version:+==$numpy_version}"
say "downloading aarch64 wheels: $tvm_req apache-tvm-ffi==$TVM_FFI_PIN $numpy_req typing_extensions psutil"
"$PYTHON" -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: \
  --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 \
  --python-version "$PYVER" --implementation cp -d "$stage/wheels" \
  "$tvm_req" "apache-tvm-ffi==$TVM_FFI_PIN" "$numpy_req" typing_extensions psutil
say "unpacking the wheels onto the device's PYTHONPATH (without libtvm_compiler.so)"
"$PYTHON" - "$stage/wheels" "$stage/site" <<'EOF'
import pathlib, sys, zipfile
wheels, site = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
skip = ("libtvm_compiler.so", "libtvm_runtime_cuda.so")  # compiler and CUDA: never used on the device
for whl in sorted(wheels.glob("*.whl")):
    with zipfile.ZipFile(whl) as z:
        z.extractall(site, [n for n in z.namelist() if not n.endswith(skip)])
EOF
# Byte-compile with the host's Python 3.11 (same bytecode magic): the emulated import starts faster.
"$PYTHON" -m compileall -q -j 0 "$stage/site" >/dev/null 2>&1 || true
rm -rf "$stage/wheels"

# 4. the info file edgecomp reads, then move into place and check the device for real.
"$PYTHON" - "$stage" "$EMU_HOME" "$PYVER" <<'EOF'
import datetime, json, pathlib, shutil, subprocess, sys
stage, home, pyver = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
site = stage / "site"
versions = dict(d.name.removesuffix(".dist-info").split("-")[:2] for d in site.glob("*.dist-info"))
qemu = shutil.which("qemu-aarch64")
info = {
    "format": "edgecomp-emu-arm64",
    "version": 1,
    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "qemu": qemu,
    "qemu_version": subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout.splitlines()[0],
    "sysroot": str(home / "sysroot"),
    "python": f"usr/bin/python{pyver}",
    "site": str(home / "site"),
    "packages": versions,
}
(stage / "emu.json").write_text(json.dumps(info, indent=2) + "\n")
EOF
rm -rf "$EMU_HOME"
mv "$stage" "$EMU_HOME"
trap - EXIT
if ! version=$(device_works); then
  say "error: the emulated device does not start (qemu-aarch64 $EMU_HOME/sysroot/usr/bin/python$PYVER)" >&2
  exit 1
fi
say "done in $((SECONDS - t0)) s: $EMU_HOME ($(du -sh "$EMU_HOME" | cut -f1)); device Python imports TVM $version under qemu-aarch64"
