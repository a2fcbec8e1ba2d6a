#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for the `slurm` tests and for trying the cluster
# path on a laptop (Debian/Ubuntu, as root, no systemd needed):
#
#   apt-get install -y munge slurmctld slurmd slurm-client slurmdbd mariadb-server
#   tests/slurm/cluster.sh start     # fresh state, prints the env file to source
#   source /tmp/alexlab-slurm/env    # SLURM_CONF for sinfo, sbatch, submitit ...
#   tests/slurm/cluster.sh status
#   tests/slurm/cluster.sh stop      # cancels the jobs, then stops each daemon by the PID it wrote
#
# All state (configs, logs, PIDs, the database, job state) lives in $ALEXLAB_SLURM_DIR
# (default /tmp/alexlab-slurm). Daemons start in dependency order: munged, MariaDB, slurmdbd (sacct
# needs it: without it submitit waits forever on a cancelled job), slurmctld, slurmd.
set -euo pipefail

DIR=${ALEXLAB_SLURM_DIR:-/tmp/alexlab-slurm}
DB_PORT=${ALEXLAB_SLURM_DB_PORT:-13306}
HOST=$(hostname -s)
export SLURM_CONF=$DIR/etc/slurm.conf

die() { echo "cluster.sh: $*" >&2; exit 1; }
pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: poll until COMMAND succeeds
    local limit=$1 what=$2; shift 2
    for _ in $(seq $((limit * 10))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
    die "$what did not come up in ${limit}s; see the logs in $DIR/log"
}

write_configs() {
    mkdir -p "$DIR"/{etc,log,run,ctld,spool,db}
    # The node advertises the machine's real CPUs and memory (slurmd -C), no GPUs.
    local node
    node=$(slurmd -C | head -1 | sed "s/^NodeName=[^ ]*/NodeName=$HOST NodeAddr=127.0.0.1/")
    cat > "$DIR/etc/slurm.conf" <<EOF
ClusterName=alexlab
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire=5 and one-second scheduling: a requeued job restarts in seconds, not two minutes.
AuthInfo=cred_expire=5
SchedulerParameters=bf_interval=1,sched_interval=1
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# No cgroups (containers, no systemd): track processes through /proc, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
MpiDefault=none
ReturnToService=2
KillWait=5
MinJobAge=30
InactiveLimit=0
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
$node State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    cat > "$DIR/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$DIR/etc/slurmdbd.conf"  # slurmdbd refuses a readable config (it holds the DB password)
    echo "export SLURM_CONF=$SLURM_CONF" > "$DIR/env"
}

start_munge() {
    # Reuse a munged that is already serving the default socket; otherwise start one and own it.
    if munge -n </dev/null >/dev/null 2>&1; then return; fi
    [ -f /etc/munge/munge.key ] || { mungekey --create 2>/dev/null || create-munge-key -f; }
    chown munge:munge /etc/munge/munge.key && chmod 600 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge && chown munge:munge /run/munge /var/log/munge /var/lib/munge
    su -s /bin/sh munge -c "munged --pid-file=/run/munge/munged.pid" \
        || runuser -u munge -- munged --pid-file=/run/munge/munged.pid
    cp /run/munge/munged.pid "$DIR/run/munged.pid"  # ours to stop
    wait_for 10 munged sh -c 'munge -n </dev/null'
}

start_mariadb() {
    mariadb-install-db --user=root --datadir="$DIR/db" --auth-root-authentication-method=socket \
        --skip-test-db >"$DIR/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed: $DIR/log/mariadb-install.log"
    mariadbd --user=root --datadir="$DIR/db" --socket="$DIR/run/mysql.sock" --pid-file="$DIR/run/mariadb.pid" \
        --bind-address=127.0.0.1 --port="$DB_PORT" --skip-name-resolve --log-error="$DIR/log/mariadb.log" &
    wait_for 30 MariaDB mariadb --socket="$DIR/run/mysql.sock" -e "SELECT 1"
    mariadb --socket="$DIR/run/mysql.sock" -e "
        CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
        CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
}

cluster_up() { sinfo -h -o %T 2>/dev/null | grep -qx idle && sacct -n -X >/dev/null 2>&1; }

start() {
    if cluster_up; then echo "cluster already running; source $DIR/env"; return; fi
    stop >/dev/null 2>&1 || true
    # A fresh state directory: job ids restart at 1, so tests use a fresh submitit folder each run.
    rm -rf "$DIR"
    write_configs
    start_munge
    start_mariadb
    slurmdbd
    wait_for 30 slurmdbd sacctmgr -n show cluster
    slurmctld
    wait_for 30 slurmctld scontrol ping
    slurmd
    wait_for 30 "slurmd (node idle)" sh -c 'sinfo -h -o %T | grep -qx idle'
    wait_for 30 "accounting (sacct)" sacct -n -X
    echo "cluster up: $(sinfo -h -o '%P %D %c cpus %m MB %T'); source $DIR/env"
}

stop() {
    if [ -f "$SLURM_CONF" ] && pid_alive "$DIR/run/slurmctld.pid"; then
        scancel --full --user="$(id -un)" 2>/dev/null || true
        for _ in $(seq 100); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.1; done
    fi
    # Each daemon by the PID it wrote, in reverse start order; never by name (other things run here).
    for name in slurmd slurmctld slurmdbd mariadb munged; do
        local pidfile=$DIR/run/$name.pid
        if pid_alive "$pidfile"; then
            local pid; pid=$(cat "$pidfile")
            kill "$pid"
            for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
        fi
        rm -f "$pidfile"
    done
    echo "cluster stopped"
}

status() {
    if [ -f "$SLURM_CONF" ] && cluster_up; then
        sinfo; echo "SLURM_CONF=$SLURM_CONF"
    else
        echo "cluster not running (state in $DIR)"; return 1
    fi
}

for tool in munged mariadbd slurmctld slurmd slurmdbd sinfo; do
    command -v "$tool" >/dev/null || die "$tool not found: apt-get install -y munge slurmctld slurmd slurm-client slurmdbd mariadb-server"
done
case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) die "usage: $0 start|stop|status" ;;
esac
