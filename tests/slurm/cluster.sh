#!/usr/bin/env bash
# A real single-node SLURM cluster on localhost, for tests.
#
#   tests/slurm/cluster.sh install   # apt-get the missing Debian packages (root)
#   tests/slurm/cluster.sh start     # munged, mariadbd, slurmdbd, slurmctld, slurmd
#   tests/slurm/cluster.sh status    # which daemons are up
#   tests/slurm/cluster.sh stop      # stop exactly the daemons started from this dir
#
# Everything (configs, state, logs, PID files, MariaDB datadir and socket, munge key
# and socket) lives under ${SLURM_TEST_DIR:-/tmp/sam-slurm}. After `start`, callers
#   source "$SLURM_TEST_DIR/env.sh"     # exports SLURM_CONF, puts $SLURM_TEST_DIR/bin first in PATH
# Partition: "debug" (default). See tests/slurm/README.md.
set -euo pipefail

D=${SLURM_TEST_DIR:-/tmp/sam-slurm}
case "$D" in /*) ;; *) D="$PWD/$D" ;; esac
CLUSTER=samtest
PARTITION=debug
ACCOUNT=samtest
PORT_BASE=${SLURM_TEST_PORT_BASE:-16817}        # slurmctld, slurmd, slurmdbd, mariadb = base..base+3
[[ "$PORT_BASE" =~ ^[1-9][0-9]{2,4}$ ]] || { echo "SLURM_TEST_PORT_BASE: not a port: $PORT_BASE" >&2; exit 2; }
CTLD_PORT=$PORT_BASE
SLURMD_PORT=$((PORT_BASE + 1))
DBD_PORT=$((PORT_BASE + 2))
DB_PORT=$((PORT_BASE + 3))
START_TIMEOUT=${SLURM_TEST_START_TIMEOUT:-90}     # seconds, per wait

ETC=$D/etc RUN=$D/run LOG=$D/log STATE=$D/state DB_DIR=$D/mariadb
SLURM_CONF_FILE=$ETC/slurm.conf
MUNGE_SOCKET=$RUN/munge.socket
DB_SOCKET=$RUN/mariadb.sock

# name -> PID file, expected executable (checked against /proc/PID/exe before signalling)
DAEMONS=(slurmd slurmctld slurmdbd mariadbd munged)   # stop order; start is the reverse
pidfile() { echo "$RUN/$1.pid"; }
# Debian installs slurmctld/slurmd as alternatives links (-> slurmctld-wlm): resolve them
exe_of() { readlink -f "/usr/sbin/$1"; }

log() { echo "[cluster.sh] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

need_root() { [ "$(id -u)" -eq 0 ] || die "must run as root (SlurmUser=root, slurmd needs root)"; }

# PID of a daemon started from this dir if it is running, else nothing (exit 1).
# A PID file whose process is gone or is another program is stale.
running_pid() {
  local f pid exe
  f=$(pidfile "$1")
  [ -s "$f" ] || return 1
  pid=$(tr -dc '0-9' <"$f")
  [ -n "$pid" ] || return 1
  exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
  exe=${exe% (deleted)}
  [ "$exe" = "$(exe_of "$1")" ] || return 1
  echo "$pid"
}

tail_log() { # file
  if [ -f "$1" ]; then
    log "---- last lines of $1 ----"
    tail -n 25 "$1" >&2 || true
  fi
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# wait_for DESC LOGFILE CMD...: poll CMD until it succeeds or START_TIMEOUT passes
wait_for() {
  local desc=$1 logf=$2 t=0
  shift 2
  until "$@" >/dev/null 2>&1; do
    if [ "$t" -ge $((START_TIMEOUT * 5)) ]; then
      tail_log "$logf"
      die "timed out after ${START_TIMEOUT}s waiting for $desc (log: $logf)"
    fi
    sleep 0.2
    t=$((t + 1))
  done
}

# ---------------------------------------------------------------------------- install
cmd_install() {
  need_root
  local pkgs=(slurm-wlm slurmdbd munge mariadb-server mariadb-client) missing=() p
  for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed' || missing+=("$p")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    log "packages already installed: ${pkgs[*]}"
    return 0
  fi
  log "installing: ${missing[*]}"
  # Keep the packages' init scripts from starting system-wide munge/mariadb daemons.
  local made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    made_policy=1
  fi
  local rc=0
  {
    export DEBIAN_FRONTEND=noninteractive
    # another apt/dpkg may hold the lock (shared machine): wait for it
    if [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' -print -quit 2>/dev/null)" ]; then
      apt-get -o DPkg::Lock::Timeout=300 update -qq
    fi
    apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "${missing[@]}" ||
      { apt-get -o DPkg::Lock::Timeout=300 update -qq &&
        apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "${missing[@]}"; }
  } >"/tmp/sam-slurm-apt.$$.log" 2>&1 || rc=$?
  [ "$made_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
  if [ "$rc" -ne 0 ]; then
    tail -n 30 "/tmp/sam-slurm-apt.$$.log" >&2
    die "apt-get failed (full log: /tmp/sam-slurm-apt.$$.log)"
  fi
  rm -f "/tmp/sam-slurm-apt.$$.log"
  log "installed: ${missing[*]}"
}

# ---------------------------------------------------------------------------- configs
write_configs() {
  local cpus mem_total mem def_mem
  cpus=${SLURM_TEST_CPUS:-$(nproc)}
  local v
  for v in "$cpus" "${SLURM_TEST_MEM_MB:-1}" "${SLURM_TEST_DEF_MEM_PER_CPU:-1}"; do
    [[ "$v" =~ ^[1-9][0-9]*$ ]] || die "not a positive integer: '$v' (SLURM_TEST_CPUS/_MEM_MB/_DEF_MEM_PER_CPU)"
  done
  mem_total=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
  # leave 10% (at least 512 MB) to the OS and the daemons
  mem=${SLURM_TEST_MEM_MB:-$((mem_total - (mem_total / 10 > 512 ? mem_total / 10 : 512)))}
  def_mem=${SLURM_TEST_DEF_MEM_PER_CPU:-$((mem / cpus < 1024 ? mem / cpus : 1024))}

  cat >"$SLURM_CONF_FILE" <<EOF
# generated by tests/slurm/cluster.sh -- edits are overwritten on start
ClusterName=$CLUSTER
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
MpiDefault=none
SwitchType=switch/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=300
# schedule batch jobs at once (default: up to 3 s later)
SchedulerParameters=batch_sched_delay=0
KillWait=5
InactiveLimit=0
Waittime=0
MailProg=/bin/true
DefMemPerCPU=$def_mem
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$(pidfile slurmctld)
SlurmdPidFile=$(pidfile slurmd)
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
# the slurmdbd connection authenticates with this munge socket, not with AuthInfo
AccountingStoragePass=socket=$MUNGE_SOCKET
NodeName=localhost NodeHostname=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF

  if [ ! -s "$ETC/db.pass" ]; then
    (umask 077; head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$ETC/db.pass")
  fi
  (umask 077; cat >"$ETC/slurmdbd.conf" <<EOF
# generated by tests/slurm/cluster.sh -- edits are overwritten on start
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
DebugLevel=info
LogFile=$LOG/slurmdbd.log
PidFile=$(pidfile slurmdbd)
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$(cat "$ETC/db.pass")
StorageLoc=slurm_acct_db
EOF
  )
  chmod 600 "$ETC/slurmdbd.conf"

  # Client wrappers that default SLURM_CONF: Snakemake's jobstep plugin drops every SLURM_*
  # variable (SLURM_CONF included) before its srun inside a job, and this cluster has no
  # /etc/slurm/slurm.conf; PATH is kept, so $D/bin first in PATH lets that srun find us.
  local c
  mkdir -p "$D/bin"
  for c in srun sbatch salloc squeue sacct scancel sinfo scontrol sacctmgr sstat sshare sprio sattach; do
    [ -x "/usr/bin/$c" ] || continue
    cat >"$D/bin/$c" <<EOF
#!/bin/sh
# generated by tests/slurm/cluster.sh
SLURM_CONF=\${SLURM_CONF:-$SLURM_CONF_FILE} exec /usr/bin/$c "\$@"
EOF
    chmod 755 "$D/bin/$c"
  done

  cat >"$D/env.sh" <<EOF
# source this file to use the test cluster started by tests/slurm/cluster.sh
export SLURM_TEST_DIR=$D
export SLURM_CONF=$SLURM_CONF_FILE
case ":\$PATH:" in *":$D/bin:"*) ;; *) export PATH="$D/bin:\$PATH" ;; esac
EOF
}

# ---------------------------------------------------------------------------- daemons
start_munged() {
  if [ ! -s "$ETC/munge.key" ]; then
    (umask 077; dd if=/dev/urandom of="$ETC/munge.key" bs=1024 count=1 status=none)
  fi
  chmod 400 "$ETC/munge.key"
  # --force: reuse a socket left behind by an unclean stop
  munged --force --key-file="$ETC/munge.key" --socket="$MUNGE_SOCKET" \
    --pid-file="$(pidfile munged)" --log-file="$LOG/munged.log" \
    --seed-file="$STATE/munged.seed" </dev/null >>"$LOG/munged.log" 2>&1 ||
    { tail_log "$LOG/munged.log"; die "munged failed to start"; }
  wait_for "munged" "$LOG/munged.log" sh -c "munge -n -S '$MUNGE_SOCKET' | unmunge -S '$MUNGE_SOCKET'"
}

db_sql() { mariadb --no-defaults --socket="$DB_SOCKET" -u root "$@"; }

start_mariadbd() {
  if [ ! -d "$DB_DIR/mysql" ]; then
    rm -rf "$DB_DIR"
    mkdir -p "$DB_DIR"
    mariadb-install-db --no-defaults --datadir="$DB_DIR" --user=root \
      --auth-root-authentication-method=socket --skip-test-db \
      >"$LOG/mariadb-install-db.log" 2>&1 ||
      { tail_log "$LOG/mariadb-install-db.log"; die "mariadb-install-db failed"; }
  fi
  # own session, no inherited stdio: callers that capture our output must not hang on it
  setsid mariadbd --no-defaults --user=root --datadir="$DB_DIR" --socket="$DB_SOCKET" \
    --pid-file="$(pidfile mariadbd)" --bind-address=127.0.0.1 --port="$DB_PORT" \
    --log-error="$LOG/mariadb.log" --skip-name-resolve --skip-log-bin \
    --innodb-buffer-pool-size=128M --innodb-log-file-size=64M --innodb-lock-wait-timeout=900 \
    --innodb-flush-log-at-trx-commit=2 --max-connections=100 \
    </dev/null >>"$LOG/mariadb.log" 2>&1 &
  wait_for "mariadbd" "$LOG/mariadb.log" db_sql -e 'SELECT 1'
  wait_for "mariadbd PID file" "$LOG/mariadb.log" running_pid mariadbd
  local pass
  pass=$(cat "$ETC/db.pass")
  db_sql <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$pass';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
EOF
}

start_slurmdbd() {
  slurmdbd </dev/null >>"$LOG/slurmdbd.log" 2>&1 ||
    { tail_log "$LOG/slurmdbd.log"; die "slurmdbd failed to start"; }
  wait_for "slurmdbd" "$LOG/slurmdbd.log" sacctmgr -n -P show cluster
}

register_accounting() {
  # the cluster must exist in the database before slurmctld registers with slurmdbd
  if [ -z "$(sacctmgr -n -P show cluster "$CLUSTER" format=cluster 2>/dev/null)" ]; then
    sacctmgr -i -Q add cluster "$CLUSTER" >/dev/null
  fi
  if [ -z "$(sacctmgr -n -P show account "$ACCOUNT" format=account 2>/dev/null)" ]; then
    sacctmgr -i -Q add account "$ACCOUNT" cluster="$CLUSTER" \
      description="sam test account" organization=samtest >/dev/null
  fi
  local user
  user=$(id -un)
  if ! sacctmgr -n -P show assoc where user="$user" account="$ACCOUNT" cluster="$CLUSTER" \
    format=user 2>/dev/null | grep -qx "$user"; then
    sacctmgr -i -Q add user "$user" account="$ACCOUNT" cluster="$CLUSTER" >/dev/null
  fi
  sacctmgr -i -Q modify user where name="$user" set defaultaccount="$ACCOUNT" >/dev/null 2>&1 || true
}

start_slurmctld() {
  slurmctld -f "$SLURM_CONF_FILE" </dev/null >>"$LOG/slurmctld.log" 2>&1 ||
    { tail_log "$LOG/slurmctld.log"; die "slurmctld failed to start"; }
  wait_for "slurmctld" "$LOG/slurmctld.log" scontrol ping
}

start_slurmd() {
  slurmd -f "$SLURM_CONF_FILE" -N localhost </dev/null >>"$LOG/slurmd.log" 2>&1 ||
    { tail_log "$LOG/slurmd.log"; die "slurmd failed to start"; }
}

node_idle() {
  local st
  st=$(sinfo -h -n localhost -o %T 2>/dev/null) || return 1
  case $st in idle | mixed | allocated) return 0 ;; *) return 1 ;; esac
}

print_env() {
  echo "export SLURM_TEST_DIR=$D"
  echo "export SLURM_CONF=$SLURM_CONF_FILE"
  echo "export PATH=$D/bin:\$PATH"
}

cmd_start() {
  need_root
  local d up=() down=() t0=$SECONDS
  for d in "${DAEMONS[@]}"; do
    if running_pid "$d" >/dev/null; then up+=("$d"); else down+=("$d"); fi
  done
  if [ ${#down[@]} -eq 0 ]; then
    log "already running from $D"
    print_env
    return 0
  fi
  [ ${#up[@]} -eq 0 ] || die "partially running from $D (up: ${up[*]}; down: ${down[*]}); run '$0 stop' first"
  for b in munged munge unmunge mariadbd mariadb-install-db mariadb slurmdbd slurmctld slurmd sacctmgr sinfo; do
    command -v "$b" >/dev/null || die "$b not found; run '$0 install' first"
  done
  local p
  for p in "$CTLD_PORT" "$SLURMD_PORT" "$DBD_PORT" "$DB_PORT"; do
    ! port_in_use "$p" || die "port $p on 127.0.0.1 is in use (another cluster? set SLURM_TEST_PORT_BASE)"
  done

  mkdir -p "$ETC" "$RUN" "$LOG" "$STATE/slurmctld" "$STATE/slurmd"
  chmod 700 "$ETC"
  chmod 755 "$D" "$RUN" "$LOG" "$STATE"   # munged refuses group/other-writable dirs
  rm -f "$RUN"/*.pid
  write_configs
  export SLURM_CONF=$SLURM_CONF_FILE

  # on any failure below, stop what this start launched (by PID file) before exiting
  trap 'rc=$?; if [ "$rc" -ne 0 ]; then log "start failed; stopping the daemons it started"; cmd_stop || true; fi' EXIT
  log "starting munged";    start_munged
  log "starting mariadbd";  start_mariadbd
  log "starting slurmdbd";  start_slurmdbd
  register_accounting
  log "starting slurmctld"; start_slurmctld
  log "starting slurmd";    start_slurmd
  wait_for "node localhost to become idle (sinfo)" "$LOG/slurmd.log" node_idle
  if ! node_idle; then tail_log "$LOG/slurmctld.log"; die "node not idle"; fi
  trap - EXIT
  log "cluster '$CLUSTER' up in $((SECONDS - t0))s; partition '$PARTITION'; logs in $LOG"
  print_env
}

# ---------------------------------------------------------------------------- stop
# exited processes can stay zombies for a while (PID 1 in these containers reaps late)
alive() {
  local st
  st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
  [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}

stop_daemon() { # name
  local pid f t=0
  f=$(pidfile "$1")
  if pid=$(running_pid "$1"); then
    kill -TERM "$pid" 2>/dev/null || true
    while alive "$pid"; do
      if [ "$t" -ge 150 ]; then # 30 s
        log "$1 ($pid) did not exit after SIGTERM; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
      fi
      sleep 0.2
      t=$((t + 1))
    done
    log "stopped $1 ($pid)"
  fi
  rm -f "$f"
}

cmd_stop() {
  export SLURM_CONF=$SLURM_CONF_FILE
  # cancel jobs first: their slurmstepd processes are not in our PID files
  if running_pid slurmctld >/dev/null && [ -f "$SLURM_CONF_FILE" ]; then
    local jobs t=0
    jobs=$(squeue -h -o %A 2>/dev/null || true)
    if [ -n "$jobs" ]; then
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      while [ -n "$(squeue -h -t R,CG,PD -o %A 2>/dev/null || true)" ] && [ "$t" -lt 50 ]; do
        sleep 0.2
        t=$((t + 1))
      done
    fi
    # let slurmctld hand its pending accounting records to slurmdbd (else they are replayed
    # only at the next start, and sacct shows half-filled records until then)
    t=0
    while [ "$(sdiag 2>/dev/null | awk -F: '/DBD Agent queue size/ {gsub(/ /, "", $2); print $2}')" != 0 ] &&
      [ "$t" -lt 50 ]; do
      sleep 0.2
      t=$((t + 1))
    done
  fi
  local d
  for d in "${DAEMONS[@]}"; do stop_daemon "$d"; done
}

cmd_status() {
  local d pid rc=0
  for d in "${DAEMONS[@]}"; do
    if pid=$(running_pid "$d"); then
      printf '%-10s up (pid %s)\n' "$d" "$pid"
    else
      printf '%-10s down\n' "$d"
      rc=3
    fi
  done
  if [ "$rc" -eq 0 ]; then
    SLURM_CONF=$SLURM_CONF_FILE sinfo -h -o '%P %a %D %T %c %m' 2>/dev/null | sed 's/^/sinfo: /' || true
  fi
  return "$rc"
}

case "${1:-}" in
  install) cmd_install ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) print_env ;;
  *) echo "usage: $0 {install|start|stop|status|env}   (dir: \${SLURM_TEST_DIR:-/tmp/sam-slurm})" >&2; exit 2 ;;
esac
