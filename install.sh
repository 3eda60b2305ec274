#!/usr/bin/env bash
# install.sh: install iot-daemons.
#
#   sudo ./install.sh                  system install: user iot, venv /opt/iot (versions pinned by
#                                      deploy/constraints.txt), config /etc/iot, state /var/lib/iot,
#                                      systemd units enabled under iot.target. Starts nothing.
#        --start                       ... and start iot.target (on an upgrade: restart what ran)
#        --supervisor                  supervisord instead of systemd (/etc/iot/supervisord.conf)
#        --factory                     ... and enable the simulated factory with its dashboard (seed 003)
#        --wheelhouse DIR              install offline from wheels made by --make-wheelhouse DIR
#        --root DIR                    install into a staging root (tests, packagers); no user, no start
#        --uninstall [--purge]         remove units and /opt/iot; --purge also /etc/iot, /var/lib/iot, user
#   ./install.sh --make-wheelhouse DIR every wheel the system install needs, for hosts without internet
#   ./install.sh --local               a venv in this checkout (.venv), package installed editable
#   ./install.sh --local --test-deps   the same plus the Debian packages the tests run for real
#
# Each step says what it does and whether it changed anything; a second run changes nothing. The
# first step that fails stops the script and names itself.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MODE=system
TEST_DEPS=0 START=0 SUPERVISOR=0 PURGE=0 FACTORY=0
ROOT="" WHEELHOUSE="" MAKE_WHEELHOUSE=""
APT_TEST_PACKAGES=(mosquitto mosquitto-clients mariadb-server debootstrap systemd-container chromium prometheus)
UNITS=(iot-broker.service iot-transfer-recv.service iot-transfer-send.service iot-ingest.service iot-dbsub.service
       iot.target)
# Unit files installed but not enabled themselves: iot-plc@NAME is enabled once per [[plc.device]],
# iot-ingest@I for ingest workers 2..[ingest] workers (worker 1 is iot-ingest.service),
# iot-device@NAME (NAME "all" or a device) with --factory, as [factory] processes says.
TEMPLATES=(iot-plc@.service iot-ingest@.service iot-device@.service)
# Installed always, enabled with --factory.
FACTORY_UNITS=(iot-controller.service iot-observer.service iot-dashboard.service)
CHANGED=0

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; }
step() { CURRENT="$*"; printf '==> %s\n' "$*"; }
say() { printf '    %s\n' "$*"; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }
trap 'rc=$?; [ $rc -eq 0 ] || printf "install.sh: failed at step: %s\n" "${CURRENT:-start}" >&2' EXIT

while [ $# -gt 0 ]; do
  case "$1" in
    --local) MODE=local ;;
    --test-deps) TEST_DEPS=1 ;;
    --start) START=1 ;;
    --supervisor) SUPERVISOR=1 ;;
    --factory) FACTORY=1 ;;
    --uninstall) MODE=uninstall ;;
    --purge) PURGE=1 ;;
    --root) ROOT=$(realpath -m "${2:?--root needs a folder}"); shift ;;
    --wheelhouse) WHEELHOUSE=$(realpath "${2:?--wheelhouse needs a folder}"); shift ;;
    --make-wheelhouse) MODE=wheelhouse; MAKE_WHEELHOUSE=$(realpath -m "${2:?--make-wheelhouse needs a folder}"); shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown option: $1" ;;
  esac
  shift
done

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else die "needs root: $*"; fi; }

apt_install() {
  local missing=()
  for p in "$@"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p"); done
  if [ ${#missing[@]} -eq 0 ]; then say "already installed: $*"; return; fi
  say "apt-get install ${missing[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

check_python() {
  step "check python"
  PY=${PYTHON:-python3}
  command -v "$PY" >/dev/null || die "python3 not found: sudo apt-get install python3 python3-venv"
  "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "Python >= 3.11 needed, found $("$PY" -V 2>&1)"
  if ! "$PY" -c 'import ensurepip, venv' 2>/dev/null; then
    if [ "$(id -u)" -eq 0 ] || command -v sudo >/dev/null; then apt_install python3-venv
    else die "python3 has no venv module: sudo apt-get install python3-venv"; fi
  fi
  say "$("$PY" -V)"
}

# -- a checkout venv ---------------------------------------------------------------------------

install_local() {
  check_python
  if [ "$TEST_DEPS" -eq 1 ]; then
    step "install test dependencies (Debian packages)"
    apt_install "${APT_TEST_PACKAGES[@]}"
  fi
  step "create venv $HERE/.venv"
  if [ -x "$HERE/.venv/bin/python" ]; then say "exists"; else "$PY" -m venv "$HERE/.venv"; fi
  step "install iot-daemons (editable) into the venv, versions pinned by deploy/constraints*.txt"
  # The same pinned versions as the system install: the tests run against what ships (paho's
  # receive path is tuned against one release, see daemons/mqtttune.py).
  "$HERE/.venv/bin/python" -m pip install -q --disable-pip-version-check -c "$HERE/deploy/constraints.txt" \
    -c "$HERE/deploy/constraints-test.txt" setuptools wheel -e "$HERE[test]"
  step "create state folders under $HERE/var"
  mkdir -p "$HERE"/var/{outbox,transfer,dlq,db,run,log}
  # git cannot keep a file private; iot-ingest refuses a keys file others can read.
  chmod 0600 "$HERE/etc/iot/ingest.keys"
  step "installed: $HERE/.venv/bin/iotctl, config $HERE/etc/iot/iot.toml"
}

# -- wheels for offline hosts --------------------------------------------------------------------

make_wheelhouse() {
  check_python
  step "download pinned wheels into $MAKE_WHEELHOUSE"
  mkdir -p "$MAKE_WHEELHOUSE"
  # pip wheel, not download: an sdist among them (sdnotify) becomes a wheel, so the target builds nothing.
  "$PY" -m pip wheel -q --disable-pip-version-check -w "$MAKE_WHEELHOUSE" -r "$HERE/deploy/constraints.txt"
  step "build the iot-daemons wheel"
  "$PY" -m pip wheel -q --disable-pip-version-check --no-deps -w "$MAKE_WHEELHOUSE" "$HERE"
  say "$(ls "$MAKE_WHEELHOUSE" | wc -l) files; install with: sudo ./install.sh --wheelhouse $MAKE_WHEELHOUSE"
}

# -- the system install -------------------------------------------------------------------------

OPT="$ROOT/opt/iot" ETC="$ROOT/etc/iot" STATE="$ROOT/var/lib/iot" UNITDIR="$ROOT/etc/systemd/system"
LOGDIR="$ROOT/var/log/iot"
live_systemd() { [ -z "$ROOT" ] && [ "$SUPERVISOR" -eq 0 ] && [ -d /run/systemd/system ]; }

fingerprint() {
  # What the venv is built from: the pinned versions and every source file (the dashboard's page too).
  ( cd "$HERE" && cat deploy/constraints.txt pyproject.toml && find daemons -type f ! -name '*.pyc' ! -path '*/__pycache__/*' | LC_ALL=C sort | xargs cat ) \
    | sha256sum | cut -d' ' -f1
}

install_file() {  # SRC DEST MODE: never overwrite an edited DEST; keep the new default as DEST.dist
  local src=$1 dest=$2 mode=$3
  if [ ! -e "$dest" ]; then
    install -D -m "$mode" "$src" "$dest"; say "installed $dest"; CHANGED=1
  elif cmp -s "$src" "$dest"; then
    say "unchanged $dest"
  elif [ -e "$dest.dist" ] && cmp -s "$src" "$dest.dist"; then
    say "kept your edited $dest (new default already in $dest.dist)"
  else
    install -m "$mode" "$src" "$dest.dist"; say "kept your edited $dest; the new default is in $dest.dist"
  fi
}

build_venv() (
  set -e
  mkdir -p "$(dirname "$OPT")"
  "$PY" -m venv "$OPT"
  local pip=("$OPT/bin/python" -m pip install -q --disable-pip-version-check -c "$HERE/deploy/constraints.txt")
  [ -n "$WHEELHOUSE" ] && pip+=(--no-index --find-links "$WHEELHOUSE")
  "${pip[@]}" setuptools wheel
  "${pip[@]}" --no-build-isolation "$HERE"
  cp "$HERE/README.md" "$OPT/README.md"
)

install_system() {
  check_python
  if [ -z "$ROOT" ] && [ "$(id -u)" -ne 0 ]; then die "the system install needs root: sudo ./install.sh (or --local)"; fi

  WAS_RUNNING=()
  if live_systemd; then
    for u in "${UNITS[@]}" "${FACTORY_UNITS[@]}" $(enabled_instances iot-plc | sed 's/.*/iot-plc@&.service/') \
             $(enabled_instances iot-ingest | sed 's/.*/iot-ingest@&.service/') \
             $(enabled_instances iot-device | sed 's/.*/iot-device@&.service/'); do
      [ "$u" != iot.target ] && systemctl is-active --quiet "$u" && WAS_RUNNING+=("$u")
    done
  fi

  step "system user iot"
  if [ -n "$ROOT" ]; then say "staging root: not created"
  elif id iot >/dev/null 2>&1; then say "exists"
  else useradd --system --user-group --home-dir /var/lib/iot --no-create-home --shell /usr/sbin/nologin iot
       say "created"; CHANGED=1; fi

  step "venv $OPT with pinned versions"
  local fp; fp=$(fingerprint)
  if [ -f "$OPT/.fingerprint" ] && [ "$(cat "$OPT/.fingerprint")" = "$fp" ]; then
    say "up to date"
  else
    # A venv cannot move (its scripts name their interpreter by path), so it is built in place
    # with the previous one set aside, and put back if anything fails.
    rm -rf "$OPT.old"
    [ -e "$OPT" ] && mv "$OPT" "$OPT.old"
    if ! build_venv; then
      rm -rf "$OPT"; [ -e "$OPT.old" ] && mv "$OPT.old" "$OPT"
      die "building $OPT failed; the previous install is unchanged"
    fi
    echo "$fp" > "$OPT/.fingerprint"
    rm -rf "$OPT.old"
    say "installed $("$OPT/bin/python" -m pip list --format=freeze 2>/dev/null | grep -i '^iot-daemons==')"
    CHANGED=1; VENV_CHANGED=1
  fi

  step "config $ETC"
  local tmp; tmp=$(mktemp -d)
  # The installed broker asks for a password (secure by default) and the local daemons log in
  # as iot-local, whose password is made below and kept in mqtt.secret.
  sed 's|^state_dir = "../../var"|state_dir = "/var/lib/iot"|' "$HERE/etc/iot/iot.toml" | awk '
    /^\[/ { section = $0 }
    section == "[mqtt]" && /^# username = ""$/ { print "username = \"iot-local\""; next }
    section == "[mqtt]" && /^# password_file = ""$/ { print "password_file = \"/etc/iot/mqtt.secret\""; next }
    section == "[broker]" && /^# password_file = ""$/ { print "password_file = \"/etc/iot/passwd\""; next }
    { print }' > "$tmp/iot.toml"
  install_file "$tmp/iot.toml" "$ETC/iot.toml" 0644
  rm -rf "$tmp"
  if [ -e "$ETC/ingest.keys" ]; then say "unchanged $ETC/ingest.keys (keys are never replaced)"
  else
    # A fresh secret per host: the checkout's dev key must never sign production data.
    install -d -m 0755 "$ETC"
    ( umask 077; printf '# key-id hex-secret: one per line; the first signs, all verify (see README)\nk1 %s\n' \
        "$("$PY" -c 'import secrets; print(secrets.token_hex(32))')" > "$ETC/ingest.keys" )
    say "created $ETC/ingest.keys with a new random key k1 (mode 0600)"; CHANGED=1
  fi
  [ -z "$ROOT" ] && chown iot:iot "$ETC/ingest.keys"
  if [ -e "$ETC/passwd" ] && [ -e "$ETC/mqtt.secret" ]; then say "unchanged $ETC/passwd (users are never replaced)"
  else
    local secret; secret=$("$PY" -c 'import secrets; print(secrets.token_urlsafe(24))')
    ( umask 077; printf '%s\n' "$secret" > "$ETC/mqtt.secret" )
    if [ -e "$ETC/passwd" ]; then "$OPT/bin/iotctl" passwd -b "$ETC/passwd" iot-local "$secret" >/dev/null
    else "$OPT/bin/iotctl" passwd -c -b "$ETC/passwd" iot-local "$secret" >/dev/null; fi
    say "created user iot-local in $ETC/passwd for the local daemons (its password: $ETC/mqtt.secret);"
    say "add your own users with: $OPT/bin/iotctl passwd $ETC/passwd USER; systemctl reload iot-broker"
    CHANGED=1
  fi
  # The factory's roles log in with the local daemons' password; etc/iot/acl gives each its rights.
  local role
  for role in controller dashboard observer; do
    grep -q "^$role:" "$ETC/passwd" && continue
    "$OPT/bin/iotctl" passwd -b "$ETC/passwd" "$role" "$(head -n 1 "$ETC/mqtt.secret")" >/dev/null
    say "added user $role to $ETC/passwd (the factory's $role; password: $ETC/mqtt.secret)"; CHANGED=1
  done
  install_file "$HERE/etc/iot/acl" "$ETC/acl" 0644
  # The broker (user iot) reads the password file, the daemons the secret; nobody else.
  [ -z "$ROOT" ] && chown root:iot "$ETC/passwd" "$ETC/mqtt.secret"
  chmod 0640 "$ETC/passwd" "$ETC/mqtt.secret"

  step "state $STATE"
  for d in "$STATE" "$STATE/outbox" "$STATE/transfer" "$STATE/dlq" "$STATE/db" "$STATE/plc"; do
    if [ -d "$d" ]; then continue; fi
    install -d -m 0750 "$d"; CHANGED=1; say "created $d"
  done
  [ -z "$ROOT" ] && chown -R iot:iot "$STATE"
  say "ok"

  if [ "$SUPERVISOR" -eq 1 ]; then
    step "supervisord config $ETC/supervisord.conf"
    install_file "$HERE/deploy/supervisor/iot.conf" "$ETC/supervisord.conf" 0644
    install -d -m 0750 "$LOGDIR" "$STATE/run"
    supervisor_programs
    say "start it with: $OPT/bin/supervisord -c /etc/iot/supervisord.conf"
    if [ "$START" -eq 1 ] && [ -z "$ROOT" ]; then
      step "start supervisord"
      if [ -S "$STATE/run/supervisor.sock" ]; then "$OPT/bin/supervisorctl" -c "$ETC/supervisord.conf" update; say "updated"
      else "$OPT/bin/supervisord" -c "$ETC/supervisord.conf"; say "started"; fi
    fi
    return
  fi

  step "systemd units in $UNITDIR"
  local units_changed=0
  for u in "${UNITS[@]}" "${TEMPLATES[@]}" "${FACTORY_UNITS[@]}"; do
    if cmp -s "$HERE/deploy/systemd/$u" "$UNITDIR/$u" 2>/dev/null; then continue; fi
    install -D -m 0644 "$HERE/deploy/systemd/$u" "$UNITDIR/$u"; say "installed $u"; units_changed=1; CHANGED=1
  done
  [ $units_changed -eq 1 ] || say "unchanged"
  if live_systemd && [ $units_changed -eq 1 ]; then systemctl daemon-reload; say "daemon-reload"; fi

  step "enable iot.target"
  local sc=(systemctl); [ -n "$ROOT" ] && sc+=(--root="$ROOT")
  if "${sc[@]}" is-enabled --quiet iot.target 2>/dev/null && \
     "${sc[@]}" is-enabled --quiet iot-broker.service 2>/dev/null && \
     "${sc[@]}" is-enabled --quiet iot-dbsub.service 2>/dev/null; then say "already enabled"
  else "${sc[@]}" enable --quiet "${UNITS[@]}"; say "enabled"; CHANGED=1; fi
  systemd_instances iot-plc "$(configured_plcs)" "PLC units (one iot-plc@NAME per [[plc.device]] in $ETC/iot.toml)"
  systemd_instances iot-ingest "$(extra_ingest_workers)" "ingest workers 2..N (iot-ingest@I; [ingest] workers in $ETC/iot.toml)"
  if [ "$FACTORY" -eq 1 ]; then
    step "factory units (--factory)"
    local u on=1
    for u in "${FACTORY_UNITS[@]}"; do "${sc[@]}" is-enabled --quiet "$u" 2>/dev/null || on=0; done
    if [ $on -eq 1 ]; then say "already enabled"
    else
      "${sc[@]}" enable --quiet "${FACTORY_UNITS[@]}"; say "enabled ${FACTORY_UNITS[*]}"; CHANGED=1
      # Added to a running set: start them now (a fresh install starts them with iot.target).
      if live_systemd && systemctl is-active --quiet iot.target; then systemctl start "${FACTORY_UNITS[@]}"; fi
    fi
    systemd_instances iot-device "$(configured_devices)" "factory device units ([factory] processes in $ETC/iot.toml)"
  fi

  if live_systemd; then
    if [ ${#WAS_RUNNING[@]} -gt 0 ] && { [ "${VENV_CHANGED:-0}" -eq 1 ] || [ $units_changed -eq 1 ]; }; then
      step "restart what was running (upgrade)"
      systemctl restart "${WAS_RUNNING[@]}"; say "restarted ${WAS_RUNNING[*]}"
    fi
    if [ "$START" -eq 1 ]; then
      step "start iot.target"
      if systemctl is-active --quiet iot.target; then say "already running"
      else systemctl start iot.target; say "started"; fi
    fi
  fi
}

configured_plcs() {  # the [[plc.device]] names of the installed config, one per line
  "$OPT/bin/iot-plc" --list --config "$ETC/iot.toml" || die "cannot read the PLCs of $ETC/iot.toml (see above)"
}

extra_ingest_workers() {  # worker numbers past 1 ([ingest] workers); worker 1 is iot-ingest itself
  local all; all=$("$OPT/bin/iot-ingest" --list --config "$ETC/iot.toml") || die "cannot read [ingest] of $ETC/iot.toml (see above)"
  tail -n +2 <<<"$all"
}

configured_devices() {  # the iot-device@NAME instances [factory] processes asks for
  "$OPT/bin/iot-device" --list --config "$ETC/iot.toml" || die "cannot read [factory] of $ETC/iot.toml (see above)"
}

enabled_instances() {  # PREFIX: the PREFIX@NAME instances iot.target wants now
  local f
  for f in "$UNITDIR"/iot.target.wants/"$1"@*.service; do
    [ -e "$f" ] || [ -L "$f" ] || continue
    f=${f##*/"$1"@}; echo "${f%.service}"
  done
}

systemd_instances() {  # PREFIX WANTED TITLE: PREFIX@NAME enabled for each NAME wanted, and only those
  step "$3"
  local prefix=$1 want=$2 sc=(systemctl) have n changed=0
  [ -n "$ROOT" ] && sc+=(--root="$ROOT")
  have=$(enabled_instances "$prefix")
  for n in $have; do
    if ! grep -qxF "$n" <<<"$want"; then
      if live_systemd; then systemctl disable --now --quiet "$prefix@$n.service"
      else "${sc[@]}" disable --quiet "$prefix@$n.service"; fi
      say "disabled $prefix@$n (no longer in the config)"; changed=1
    fi
  done
  for n in $want; do
    if ! grep -qxF "$n" <<<"$have"; then
      "${sc[@]}" enable --quiet "$prefix@$n.service"; say "enabled $prefix@$n"; changed=1
      # One added to a running set starts now; a fresh install starts it with iot.target.
      if live_systemd && systemctl is-active --quiet iot.target; then systemctl start "$prefix@$n.service"; fi
    fi
  done
  if [ $changed -eq 1 ]; then CHANGED=1; else say "unchanged: ${want//$'\n'/ }"; fi
}

supervisor_program() {  # NAME COMMAND: the [program:NAME] block, cut from iot-dbsub's in the shipped file
  sed -n '/^\[program:iot-dbsub\]/,/^$/p' "$HERE/deploy/supervisor/iot.conf" | sed \
    -e "s|^\[program:iot-dbsub\]|[program:$1]|" -e "s|^command=.*|command=$2|" \
    -e "s|^priority=.*|priority=30|" -e "s|iot-dbsub.log|$1.log|"
}

supervisor_programs() {  # $ETC/supervisor.d/NAME.conf: one iot-plc per PLC, ingest workers 2..N; with --factory the factory
  step "programs from the config in $ETC/supervisor.d"
  local lines n f name changed=0 cmd=/opt/iot/bin
  lines=$(for n in $(configured_plcs); do echo "iot-plc-$n $cmd/iot-plc --config /etc/iot/iot.toml --plc $n"; done
          for n in $(extra_ingest_workers); do echo "iot-ingest-$n $cmd/iot-ingest --config /etc/iot/iot.toml --worker $n"; done)
  if [ "$FACTORY" -eq 1 ]; then
    lines+=$'\n'$(for n in $(configured_devices); do
      echo "iot-device-$n $cmd/iot-device --config /etc/iot/iot.toml --device $n"; done)
    for n in controller observer dashboard; do lines+=$'\n'"iot-$n $cmd/iot-$n --config /etc/iot/iot.toml"; done
  fi
  install -d -m 0755 "$ETC/supervisor.d"
  for f in "$ETC"/supervisor.d/iot-plc-*.conf "$ETC"/supervisor.d/iot-ingest-*.conf "$ETC"/supervisor.d/iot-device-*.conf; do
    [ -e "$f" ] || continue
    name=${f##*/}; name=${name%.conf}
    [ "$FACTORY" -eq 0 ] && [[ $name == iot-device-* ]] && continue  # kept as an earlier --factory made it
    cut -d' ' -f1 <<<"$lines" | grep -qxF "$name" || { rm -f "$f"; say "removed $name (no longer in the config)"; changed=1; }
  done
  while read -r name command; do
    [ -n "$name" ] || continue
    f="$ETC/supervisor.d/$name.conf"
    supervisor_program "$name" "$command" > "$f.new"
    if cmp -s "$f.new" "$f"; then rm -f "$f.new"
    else mv "$f.new" "$f"; say "wrote $name"; changed=1; fi
  done <<<"$lines"
  if [ $changed -eq 1 ]; then CHANGED=1; else say "unchanged"; fi
}

uninstall() {
  if [ -z "$ROOT" ] && [ "$(id -u)" -ne 0 ]; then die "uninstall needs root"; fi
  step "stop and remove units"
  local more=("${FACTORY_UNITS[@]}") n
  for n in $(enabled_instances iot-plc); do more+=("iot-plc@$n.service"); done
  for n in $(enabled_instances iot-ingest); do more+=("iot-ingest@$n.service"); done
  for n in $(enabled_instances iot-device); do more+=("iot-device@$n.service"); done
  if live_systemd; then systemctl disable --now --quiet "${UNITS[@]}" "${more[@]}" 2>/dev/null || true
  elif [ -d "$UNITDIR" ]; then systemctl --root="${ROOT:-/}" disable --quiet "${UNITS[@]}" "${more[@]}" 2>/dev/null || true; fi
  for u in "${UNITS[@]}" "${TEMPLATES[@]}" "${FACTORY_UNITS[@]}"; do [ -e "$UNITDIR/$u" ] && { rm -f "$UNITDIR/$u"; say "removed $u"; }; done
  live_systemd && systemctl daemon-reload
  step "remove $OPT"
  rm -rf "$OPT" "$OPT.new" "$OPT.old"; say "removed"
  if [ "$PURGE" -eq 1 ]; then
    step "purge config, state, logs and the iot user"
    rm -rf "$ETC" "$STATE" "$LOGDIR"
    if [ -z "$ROOT" ] && id iot >/dev/null 2>&1; then userdel iot; fi
    say "purged"
  else
    say "kept $ETC and $STATE (remove them with --uninstall --purge)"
  fi
}

case "$MODE" in
  local) install_local ;;
  wheelhouse) make_wheelhouse ;;
  uninstall) uninstall ;;
  system)
    install_system
    if [ "$CHANGED" -eq 0 ]; then step "nothing changed: already installed"; else step "installed"; fi ;;
esac
CURRENT=done
