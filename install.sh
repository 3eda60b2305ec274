#!/usr/bin/env bash
# install.sh: install iot-daemons.
#
#   ./install.sh --local              a venv in this checkout (.venv) with the package installed
#                                     editable; state under ./var. Safe to run again.
#   ./install.sh --local --test-deps  the same, plus the Debian packages the tests run for real
#                                     (mosquitto, mosquitto-clients, mariadb-server): needs root.
#
# Each step says what it does; the first one that fails stops the script with its name.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MODE=""
TEST_DEPS=0
APT_TEST_PACKAGES=(mosquitto mosquitto-clients mariadb-server)

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; }
step() { printf '==> %s\n' "$*"; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }
trap 'rc=$?; [ $rc -eq 0 ] || printf "install.sh: failed at step: %s\n" "${CURRENT:-start}" >&2' EXIT

while [ $# -gt 0 ]; do
  case "$1" in
    --local) MODE=local ;;
    --test-deps) TEST_DEPS=1 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown option: $1" ;;
  esac
  shift
done
[ -n "$MODE" ] || { usage >&2; die "the system install (sudo ./install.sh) is not built yet; use --local"; }

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else die "needs root: $*"; fi; }

apt_install() {
  local missing=()
  for p in "$@"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p"); done
  if [ ${#missing[@]} -eq 0 ]; then echo "    already installed: $*"; return; fi
  echo "    apt-get install ${missing[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

CURRENT="check python"
step "$CURRENT"
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null || die "python3 not found: sudo apt-get install python3 python3-venv"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "Python >= 3.11 needed, found $("$PY" -V 2>&1)"
if ! "$PY" -c 'import ensurepip, venv' 2>/dev/null; then
  if [ "$(id -u)" -eq 0 ] || command -v sudo >/dev/null; then apt_install python3-venv
  else die "python3 has no venv module: sudo apt-get install python3-venv"; fi
fi

if [ "$TEST_DEPS" -eq 1 ]; then
  CURRENT="install test dependencies (Debian packages)"
  step "$CURRENT"
  apt_install "${APT_TEST_PACKAGES[@]}"
fi

CURRENT="create venv $HERE/.venv"
step "$CURRENT"
if [ -x "$HERE/.venv/bin/python" ]; then echo "    exists"; else "$PY" -m venv "$HERE/.venv"; fi

CURRENT="install iot-daemons (editable) into the venv"
step "$CURRENT"
"$HERE/.venv/bin/python" -m pip install -q --disable-pip-version-check -e "$HERE[test]"

CURRENT="create state folders under $HERE/var"
step "$CURRENT"
mkdir -p "$HERE"/var/{outbox,transfer,dlq,db,run,log}

CURRENT="done"
step "installed: $HERE/.venv/bin/iotctl, config $HERE/etc/iot/iot.toml"
