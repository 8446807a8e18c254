#!/usr/bin/env bash
# rtharvest developer and demo entry point. Works as root on a fresh Debian 12/13; idempotent.
#
#   ./run.sh demo      generate a synthetic clinic, start a source and the harvester, harvest it
#   ./run.sh test      run the whole test suite (unit + real servers on loopback)
#   ./run.sh lint      ruff + mypy
#   ./run.sh orthanc   start the harvester Orthanc with docker/orthanc.json (extra args go to rtharvest-orthanc)
#   ./run.sh setup     only install what is needed
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")"

APT_PACKAGES=(orthanc orthanc-python orthanc-dicomweb orthanc-postgresql postgresql dcmtk dicom3tools python3 python3-venv python3-pip ca-certificates chromium sqlite3)
VENV=.venv

log() { printf '\033[1m[rtharvest]\033[0m %s\n' "$*" >&2; }

apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    local sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  # Debian starts the packaged Orthanc service on a real machine; it would hold ports 4242/8042.
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet orthanc 2>/dev/null; then
    log "stopping and disabling Debian's orthanc service (rtharvest runs its own Orthanc)"
    systemctl disable --now orthanc >/dev/null 2>&1 || true
  fi
}

setup() {
  apt_install "${APT_PACKAGES[@]}"
  # The venv must use Debian's python3: the Python plugin embeds that interpreter, and the
  # venv's site-packages goes on Orthanc's PYTHONPATH.
  local want; want=$(/usr/bin/python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  if [ -x "$VENV/bin/python" ] && [ "$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" != "$want" ]; then
    log "recreating $VENV for Python $want"; rm -rf "$VENV"
  fi
  [ -x "$VENV/bin/python" ] || { log "creating $VENV"; /usr/bin/python3 -m venv "$VENV"; }
  local stamp="$VENV/.rtharvest-installed" digest
  digest=$(cat pyproject.toml | sha256sum | cut -d' ' -f1)
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$digest" ]; then
    log "installing rtharvest and its Python dependencies into $VENV"
    "$VENV/bin/pip" install -q --upgrade pip wheel setuptools >/dev/null
    "$VENV/bin/pip" install -q -e '.[dev]' >/dev/null
    echo "$digest" > "$stamp"
  fi
}

lint() {
  "$VENV/bin/ruff" check .
  # The package folders are renamed at install time (plugin/ -> rtharvest), so mypy checks an
  # installed copy of exactly what ships, and then the tests against that same copy.
  local site status=0; site=$(mktemp -d)
  trap "rm -rf '$site'" EXIT  # also when pip or mypy fails
  "$VENV/bin/pip" install -q --no-deps --no-build-isolation --target "$site" . >/dev/null 2>&1
  rm -rf build
  (cd "$site" && "$OLDPWD/$VENV/bin/mypy" --config-file "$OLDPWD/pyproject.toml" -p rtharvest) || status=1
  MYPYPATH="$site" "$VENV/bin/mypy" --config-file pyproject.toml tests || status=1
  return "$status"
}

cmd=${1:-help}; shift || true
case "$cmd" in
  setup) setup ;;
  test) setup; exec "$VENV/bin/python" -m pytest "$@" ;;
  lint) setup; lint ;;
  demo) setup; exec "$VENV/bin/python" -m rtharvest.cli.demo "$@" ;;
  orthanc) setup; exec "$VENV/bin/rtharvest-orthanc" "$@" ;;
  *) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; [ "$cmd" = help ] ;;
esac
