#!/usr/bin/env bash
# Build an emulated aarch64 board (the `rpi5-emulated` device) on a Debian x86 machine, from the package
# registries only (Debian and PyPI), without root, binfmt_misc or any system-wide install:
#   DIR/qemu/qemu-aarch64-static   from Debian's qemu-user-static (amd64), unpacked
#   DIR/root/                      Debian 12 arm64 Python 3.11 and the libraries it loads (unpacked .debs),
#                                  plus an ARM /proc/cpuinfo (qemu opens files under -L ROOT first; ONNX
#                                  Runtime's cpuinfo parser segfaults on the host's x86 one)
#   DIR/site/                      edgeprune's runtime extra as aarch64 wheels, versions in aarch64-constraints.txt
#   DIR/bin/python3                the board's Python: qemu-aarch64-static -cpu cortex-a76 -L DIR/root python3.11
# Usage: scripts/build_aarch64_target.sh [DIR]
#   DIR defaults to ~/.cache/edgeprune/aarch64, where edgeprune's rpi5-emulated device profile looks.
#   Idempotent and resumable: every step leaves a stamp in DIR/.done and is skipped once done. It writes
#   only into DIR (apt's lists and pip's cache included). Needs apt-get, apt-cache, dpkg-deb, and a Python
#   with pip ($PYTHON, else the repository's .venv/bin/python, else python3).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
DIR=${1:-$HOME/.cache/edgeprune/aarch64}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm  # the arm64 root is Debian 12 whatever the host runs: its Python is 3.11
PY_VERSION=3.11
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
ARM_PACKAGES=(python3.11 libstdc++6)  # onnxruntime's wheel links the system libstdc++
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi

say() { printf '[aarch64 target] %s\n' "$*"; }
done_() { [ -e "$DIR/.done/$1" ]; }
mark() { mkdir -p "$DIR/.done" && touch "$DIR/.done/$1"; }
for tool in apt-get apt-cache dpkg-deb; do
    command -v "$tool" >/dev/null || { echo "error: $tool not found: this script needs a Debian-based host" >&2; exit 1; }
done
[ -r "$KEYRING" ] || { echo "error: $KEYRING missing: apt-get install debian-archive-keyring" >&2; exit 1; }

# A private apt: its own sources, lists, cache and an empty dpkg status; arm64 is its native architecture
# (the root), amd64 a foreign one (qemu).
APT=(-o "Dir::State=$DIR/apt/state" -o "Dir::State::status=$DIR/apt/state/status" -o "Dir::Cache=$DIR/apt/cache"
     -o "Dir::Etc::SourceList=$DIR/apt/sources.list" -o "Dir::Etc::SourceParts=$DIR/apt/sources.list.d"
     -o "APT::Architecture=arm64" -o "APT::Architectures::=amd64" -o "APT::Architectures::=arm64"
     -o "Debug::NoLocking=1" -o "APT::Sandbox::User=$(id -un)")

if ! done_ apt-lists; then
    say "apt lists of Debian $SUITE (amd64, arm64) from $MIRROR"
    mkdir -p "$DIR/apt/state/lists/partial" "$DIR/apt/cache/archives/partial" "$DIR/apt/sources.list.d"
    : > "$DIR/apt/state/status"
    {
        printf 'deb [arch=amd64,arm64 signed-by=%s] %s %s main\n' "$KEYRING" "$MIRROR" "$SUITE"
        printf 'deb [arch=amd64,arm64 signed-by=%s] %s %s-updates main\n' "$KEYRING" "$MIRROR" "$SUITE"
    } > "$DIR/apt/sources.list.tmp"
    mv "$DIR/apt/sources.list.tmp" "$DIR/apt/sources.list"
    apt-get "${APT[@]}" -qq update
    mark apt-lists
fi

if ! done_ debs; then
    # What installing them into an empty system takes (apt's own resolver, no Recommends): 39 packages, 16 MB.
    mapfile -t closure < <(apt-get "${APT[@]}" -s install --no-install-recommends "${ARM_PACKAGES[@]}" \
        | awk '/^Inst /{print $2}')
    say "downloading qemu-user-static and ${#closure[@]} arm64 packages"
    mkdir -p "$DIR/debs"
    (cd "$DIR/debs" && apt-get "${APT[@]}" -qq download qemu-user-static:amd64 "${closure[@]}")
    mark debs
fi

if ! done_ qemu; then
    say "unpacking qemu-aarch64-static"
    rm -rf "$DIR/qemu.tmp" "$DIR/qemu"
    dpkg-deb -x "$DIR"/debs/qemu-user-static_*_amd64.deb "$DIR/qemu.tmp"
    mkdir -p "$DIR/qemu"
    mv "$DIR/qemu.tmp/usr/bin/qemu-aarch64-static" "$DIR/qemu/"
    rm -rf "$DIR/qemu.tmp"
    mark qemu
fi

if ! done_ root; then
    say "unpacking the arm64 root"
    rm -rf "$DIR/root.tmp" "$DIR/root"
    for deb in "$DIR"/debs/*.deb; do
        case $deb in *_amd64.deb) ;; *) dpkg-deb -x "$deb" "$DIR/root.tmp" ;; esac
    done
    # qemu looks every absolute path up under the root first: folders the host's files live in must not exist
    # there, or the board would not see the host's /tmp, /home or /work. Debian packages ship none of these.
    for shadow in tmp home root work run proc sys dev; do
        rm -rf "${DIR:?}/root.tmp/$shadow"
    done
    mkdir -p "$DIR/root.tmp/proc"
    # A Raspberry Pi 5's /proc/cpuinfo (Cortex-A76, r4p1), one entry per host processor: ONNX Runtime's cpuinfo
    # reads it; the instruction set itself comes from qemu's -cpu cortex-a76 (its HWCAPs: dot product, no i8mm, no SVE).
    for ((i = 0; i < $(nproc --all); i++)); do
        printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x4\nCPU part\t: 0xd0b\nCPU revision\t: 1\n\n' "$i"
    done > "$DIR/root.tmp/proc/cpuinfo"
    printf 'Revision\t: d04170\nModel\t\t: Raspberry Pi 5 Model B Rev 1.0 (emulated by qemu)\n' >> "$DIR/root.tmp/proc/cpuinfo"
    mv "$DIR/root.tmp" "$DIR/root"
    mark root
fi

if ! done_ site; then
    say "aarch64 wheels of edgeprune[runtime] for Python $PY_VERSION"
    "$PYTHON" -m pip --version >/dev/null 2>&1 || { echo "error: $PYTHON has no pip: set PYTHON" >&2; exit 1; }
    # The runtime extra's requirements, read from pyproject.toml (one source of truth), pinned by the constraints.
    "$PYTHON" - "$REPO/pyproject.toml" > "$DIR/runtime-requirements.txt" <<'EOF'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    print("\n".join(tomllib.load(f)["project"]["optional-dependencies"]["runtime"]))
EOF
    rm -rf "$DIR/site.tmp"
    PIP_CACHE_DIR="$DIR/pip-cache" "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-warn-conflicts --root-user-action=ignore \
        --target "$DIR/site.tmp" --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
        --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 \
        -r "$DIR/runtime-requirements.txt" -c "$REPO/scripts/aarch64-constraints.txt"
    rm -rf "$DIR/site"
    mv "$DIR/site.tmp" "$DIR/site"
    mark site
fi

mkdir -p "$DIR/bin"
cat > "$DIR/bin/python3.tmp" <<'EOF'
#!/bin/sh
# Python 3.11 for aarch64 under qemu user-mode emulation (edgeprune's scripts/build_aarch64_target.sh).
# QEMU_CPU picks the emulated core (default: the Raspberry Pi 5's Cortex-A76).
here=$(cd "$(dirname "$0")/.." && pwd)
unset PYTHONHOME
export PYTHONPATH="$here/site" PYTHONNOUSERSITE=1
exec "$here/qemu/qemu-aarch64-static" -cpu "${QEMU_CPU:-cortex-a76}" -L "$here/root" "$here/root/usr/bin/python3.11" "$@"
EOF
chmod +x "$DIR/bin/python3.tmp"
mv "$DIR/bin/python3.tmp" "$DIR/bin/python3"

say "checking: $DIR/bin/python3"
"$DIR/bin/python3" -c 'import platform, numpy, onnxruntime, tokenizers
print(platform.machine(), "Python", platform.python_version(), "onnxruntime", onnxruntime.__version__,
      "numpy", numpy.__version__, "tokenizers", tokenizers.__version__)'
