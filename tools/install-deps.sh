#!/bin/sh
# install-deps.sh - install the Debian packages the build and tests need, if missing.
# Idempotent and quiet when everything is there; needs root (or sudo) otherwise.
set -e
PKGS="gcc make libc6-dev pkg-config openmpi-bin libopenmpi-dev libzmq3-dev libprotobuf-c-dev protobuf-c-compiler libcjson-dev python3"
# the aarch64 cross build of the tests and qemu to run it (make cross, tests/test_cross.c)
PKGS="$PKGS gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user-static"
# clang and its libFuzzer runtime (libclang_rt.fuzzer-x86_64.a) for make fuzz (tests/fuzz_wire.c)
PKGS="$PKGS clang libclang-rt-14-dev"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
echo "install-deps: installing:$missing" >&2
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >&2
