# shellcheck shell=bash
# Shared helpers for the tcd-ds sbatch scripts. SOURCE it, don't run it.
#
# sbatch copies the batch script into slurmd's spool dir, so "$(dirname "$0")" is NOT the repo
# inside a job; locate this file from the submit dir (or an explicit TCD_REPO):
#     source "${TCD_REPO:-$SLURM_SUBMIT_DIR}/slurm/launch.sh"
#
# Functions (all need to run inside an allocation: SLURM_JOB_ID / SLURM_JOB_NODELIST set):
#   tcd_hosts                      allocation's node names, one per line (scontrol show hostnames)
#   tcd_node_addr NAME             address of a node: NodeAddr from `scontrol show node` (node names
#                                  need not resolve, e.g. CI's n1/n2 -> 127.0.0.1); an IPv4 address
#                                  if NodeAddr is a resolvable host name
#   tcd_master_addr                address of the first node ($TCD_MASTER_ADDR wins if set); never
#                                  loopback when the job spans nodes: a node's own name often maps
#                                  to 127.0.1.1 / 127.0.0.1, so a loopback answer is replaced by the
#                                  first node's own non-loopback address (tcd_local_addr, run there)
#   tcd_local_addr                 this host's non-loopback IPv4 address: the source address of its
#                                  route to slurmctld, else of its default route, else the first
#                                  of `hostname -I`
#   tcd_master_port                10000 + SLURM_JOB_ID % 20000 ($TCD_MASTER_PORT wins): stable
#                                  across requeues of a job, distinct for concurrent jobs, below
#                                  the Linux ephemeral range (32768+); the same formula as
#                                  tcd_ds/dist.py: slurm_master_port
#   tcd_cpus_env                   export SRUN_CPUS_PER_TASK and OMP_NUM_THREADS from the job's
#                                  --cpus-per-task: srun 22.05-23.02 does not pass it on to the steps
#                                  by itself (each rank would get one CPU)
#   tcd_time_left                  seconds left before the job's time limit (`squeue -o %L`); empty
#                                  when unlimited or unknown
#   tcd_write_hostfile PATH [SLOTS]  DeepSpeed hostfile "<node> slots=N" per node of the allocation;
#                                  SLOTS defaults to SLURM_NTASKS_PER_NODE, else 1
#   tcd_iface ADDR                 the network interface this host reaches ADDR through: the one that
#                                  holds it, else the one of its route (`ip route get`)
#   tcd_export_dist_env            in the batch shell: export MASTER_ADDR, MASTER_PORT, WORLD_SIZE,
#                                  and NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME (each unless set) =
#                                  tcd_iface MASTER_ADDR: gloo (CPU runs, and the start-up barriers
#                                  on GPU runs) otherwise binds to what the host name resolves to,
#                                  often 127.0.1.1, and hangs. Assumes the nodes name that interface
#                                  alike (eth0, ib0, ...); set both yourself where they do not.
#   tcd_rank_env                   inside a task (srun ... bash -c '...'): export RANK, LOCAL_RANK,
#                                  WORLD_SIZE, NODE_RANK from SLURM_PROCID/LOCALID/NTASKS/NODEID
#   tcd_srun_requeueable [--run-dir DIR] CMD...
#                                  preemption and the requeue chain: run CMD (an `srun ...` line) in
#                                  the background; a SIGUSR1 or SIGTERM to the batch shell (sbatch
#                                  --signal=B:USR1@T, `scancel --signal=USR1 --batch JOB`, preemption's
#                                  SIGTERM) is forwarded at once to every task (`scancel --signal=SIG
#                                  $SLURM_JOB_ID` = all steps, not the batch shell); the tasks
#                                  checkpoint and exit with status 85 (TCD_REQUEUE_EXIT). When CMD has
#                                  returned 85 (with or without a signal to the batch shell) the job is
#                                  requeued (`scontrol requeue $SLURM_JOB_ID`), the rerun sees
#                                  SLURM_RESTART_COUNT=1,2,... Any other status ends the chain: one
#                                  line naming it, and CMD's status is returned (the job's exit code).
#                                  Deadline: after a signal the job is requeued TCD_REQUEUE_MARGIN
#                                  seconds (default 60) before its time limit even when the ranks have
#                                  not returned (a save slower than the signal's lead time, a hung
#                                  rank): a job that reaches its limit ends TIMEOUT and is never
#                                  requeued. That requeue needs progress: a complete checkpoint in
#                                  DIR/checkpoints (step_N/complete.json) newer than the one the job
#                                  started from; without one (a hang, or no --run-dir) the chain ends
#                                  with one `error:` line and status 124. TCD_MAX_REQUEUES (default 3):
#                                  after that many requeues in a row without a new complete checkpoint
#                                  (counted in DIR/.requeues; without --run-dir every requeue of the
#                                  job counts) the chain ends with one `error:` line and CMD's status.
#                                  The rerun resumes from the last complete checkpoint.
#                                  See tests/slurm_cluster.py and tests/test_slurm_cluster.py.
tcd_hosts() {
    scontrol show hostnames "${SLURM_JOB_NODELIST:?tcd_hosts: not inside a Slurm allocation}"
}

tcd_node_addr() {
    local name="${1:?tcd_node_addr NAME}" addr ip
    addr=$(scontrol -o show node "$name" 2>/dev/null | tr ' ' '\n' | sed -n 's/^NodeAddr=//p' | head -n1)
    [ -n "$addr" ] || addr="$name"
    if [[ ! "$addr" =~ ^[0-9]+(\.[0-9]+){3}$ ]]; then
        ip=$(getent ahostsv4 "$addr" 2>/dev/null | awk 'NR==1{print $1}')
        [ -n "$ip" ] && addr="$ip"
    fi
    printf '%s\n' "$addr"
}

_tcd_loopback() { [[ "$1" =~ ^127\. || "$1" == ::1 || "$1" == localhost ]]; }

_tcd_route_src() {  # the source address this host uses to reach IPv4 address $1 (nothing is sent)
    ip -4 -o route get "$1" 2>/dev/null | sed -n 's/.* src \([0-9.]*\).*/\1/p' | head -n1
}

tcd_local_addr() {
    local ctld addr
    ctld=$(scontrol show config 2>/dev/null | sed -n 's/^SlurmctldHost\[0\] *= *//p' | head -n1)
    if [[ "$ctld" == *"("*")"* ]]; then ctld="${ctld#*(}"; ctld="${ctld%)*}"; fi
    [ -z "$ctld" ] || [[ "$ctld" =~ ^[0-9]+(\.[0-9]+){3}$ ]] \
        || ctld=$(getent ahostsv4 "$ctld" 2>/dev/null | awk 'NR==1{print $1}')
    for addr in ${ctld:+"$(_tcd_route_src "$ctld")"} "$(_tcd_route_src 1.1.1.1)" \
                $(hostname -I 2>/dev/null | tr ' ' '\n' | grep -E '^[0-9]+(\.[0-9]+){3}$'); do
        if [ -n "$addr" ] && ! _tcd_loopback "$addr"; then printf '%s\n' "$addr"; return 0; fi
    done
    return 1
}

tcd_master_addr() {
    if [ -n "${TCD_MASTER_ADDR:-}" ]; then printf '%s\n' "$TCD_MASTER_ADDR"; return; fi
    local first addr
    first=$(tcd_hosts | head -n1) || return 1
    addr=$(tcd_node_addr "$first")
    if _tcd_loopback "$addr" && [ "$(tcd_hosts | wc -l)" -gt 1 ]; then
        # ranks on other nodes would dial their own loopback: use the first node's real address
        if [ "${SLURMD_NODENAME:-}" = "$first" ]; then
            addr=$(tcd_local_addr)
        else  # not on the first node (the batch shell normally is): ask it
            addr=$(srun --nodes=1 --ntasks=1 --nodelist="$first" --overlap bash -c \
                   "source '${BASH_SOURCE[0]}' && tcd_local_addr" 2>/dev/null | head -n1)
        fi
        if [ -z "$addr" ] || _tcd_loopback "$addr"; then
            echo "tcd: node $first resolves to loopback and has no other IPv4 address: set TCD_MASTER_ADDR" >&2
            return 1
        fi
    fi
    printf '%s\n' "$addr"
}

tcd_master_port() {
    if [ -n "${TCD_MASTER_PORT:-}" ]; then printf '%s\n' "$TCD_MASTER_PORT"; return; fi
    echo $(( 10000 + ${SLURM_JOB_ID:?tcd_master_port: SLURM_JOB_ID unset} % 20000 ))
}

tcd_cpus_env() {
    local cpus="${SLURM_CPUS_PER_TASK:-1}"
    export SRUN_CPUS_PER_TASK="$cpus" OMP_NUM_THREADS="${OMP_NUM_THREADS:-$cpus}"
}

tcd_time_left() {
    local left d=0 h=0 m=0 s=0
    left=$(squeue -h -j "${SLURM_JOB_ID:?tcd_time_left: SLURM_JOB_ID unset}" -o %L 2>/dev/null | head -n1)
    left="${left//[[:space:]]/}"
    [[ "$left" =~ ^([0-9]+-)?([0-9]+:){0,2}[0-9]+$ ]] || return 0  # UNLIMITED, NOT_SET, INVALID, ""
    if [[ "$left" == *-* ]]; then d="${left%%-*}"; left="${left#*-}"; fi
    IFS=: read -r -a parts <<< "$left"
    case ${#parts[@]} in
        3) h=${parts[0]} m=${parts[1]} s=${parts[2]} ;;
        2) m=${parts[0]} s=${parts[1]} ;;
        1) s=${parts[0]} ;;
    esac
    echo $(( 10#$d * 86400 + 10#$h * 3600 + 10#$m * 60 + 10#$s ))
}

tcd_write_hostfile() {
    local path="${1:?tcd_write_hostfile PATH [SLOTS]}" slots="${2:-${SLURM_NTASKS_PER_NODE:-1}}" h
    slots="${slots%%(*}"   # "2(x2)" form of SLURM_TASKS_PER_NODE-like values
    : > "$path"
    for h in $(tcd_hosts); do printf '%s slots=%s\n' "$h" "$slots" >> "$path"; done
}

tcd_iface() {
    local addr="${1:?tcd_iface ADDR}" dev
    [[ "$addr" =~ ^[0-9]+(\.[0-9]+){3}$ ]] || addr=$(getent ahostsv4 "$addr" 2>/dev/null | awk 'NR==1{print $1}')
    [ -n "$addr" ] || return 1
    # the interface holding the address (on the master's node a route to it goes through lo)
    dev=$(ip -4 -o addr show 2>/dev/null | awk -v a="$addr" '{split($4, p, "/"); if (p[1] == a) {print $2; exit}}')
    [ -n "$dev" ] || dev=$(ip -4 -o route get "$addr" 2>/dev/null | sed -n 's/.* dev \([^ ]*\).*/\1/p' | head -n1)
    [ -n "$dev" ] && printf '%s\n' "$dev"
}

tcd_export_dist_env() {
    local dev
    MASTER_ADDR=$(tcd_master_addr) && MASTER_PORT=$(tcd_master_port) || return 1
    export MASTER_ADDR MASTER_PORT WORLD_SIZE="${SLURM_NTASKS:-1}"
    if [ -z "${NCCL_SOCKET_IFNAME:-}" ] || [ -z "${GLOO_SOCKET_IFNAME:-}" ]; then
        if dev=$(tcd_iface "$MASTER_ADDR"); then
            export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-$dev}" GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-$dev}"
        else
            echo "tcd: no network interface found for ${MASTER_ADDR}: NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME left unset" >&2
        fi
    fi
}

tcd_rank_env() {
    export RANK="${SLURM_PROCID:?tcd_rank_env: not inside a Slurm task}" \
           LOCAL_RANK="${SLURM_LOCALID:-0}" WORLD_SIZE="${SLURM_NTASKS:-1}" \
           NODE_RANK="${SLURM_NODEID:-0}"
}

TCD_REQUEUE_EXIT=85  # a rank's status after a signal save: "requeue me" (tcd_ds/train.py: REQUEUE_EXIT)
TCD_GOT_SIGNAL=""
TCD_DEADLINE=""
TCD_INTERRUPTED=0
_tcd_on_signal() {  # $1: USR1 or TERM, as received by the batch shell
    local left
    TCD_INTERRUPTED=1
    [ -n "$TCD_GOT_SIGNAL" ] && return  # a second signal (scancel --full, USR1 then TERM): already stopping
    TCD_GOT_SIGNAL=$1
    scancel --signal="$1" "$SLURM_JOB_ID" || true  # forward first: every second before the save counts
    left=$(tcd_time_left)
    if [ -n "$left" ]; then
        TCD_DEADLINE=$(( SECONDS + left - ${TCD_REQUEUE_MARGIN:-60} ))
        echo "tcd: SIG$1 in batch shell of job ${SLURM_JOB_ID} (${left} s left): forwarded to all tasks;" \
             "requeueing in at most $(( TCD_DEADLINE > SECONDS ? TCD_DEADLINE - SECONDS : 0 )) s" \
             "(TCD_REQUEUE_MARGIN=${TCD_REQUEUE_MARGIN:-60})" >&2
    else
        echo "tcd: SIG$1 in batch shell of job ${SLURM_JOB_ID}: forwarded to all tasks" >&2
    fi
}

_tcd_newest_step() {  # step of the newest complete checkpoint under RUN_DIR/checkpoints (0: none)
    local f n best=0
    for f in "$1"/checkpoints/step_*/complete.json; do
        [ -f "$f" ] || continue
        n="${f%/complete.json}"; n="${n##*/step_}"
        [[ "$n" =~ ^[0-9]+$ ]] && (( 10#$n > best )) && best=$(( 10#$n ))
    done
    echo "$best"
}

_tcd_status_meaning() {
    case "$1" in
        0) echo "the run finished" ;;
        2) echo "an error the run cannot get past: see the error: line above" ;;
        3) echo "non-finite loss: see the error: line above" ;;
        *) if [ "$1" -gt 128 ]; then echo "a rank was killed by signal $(( $1 - 128 ))"; else echo "a rank failed"; fi ;;
    esac
}

tcd_srun_requeueable() {
    local run_dir="" pid rc st overdue=0 start=0 now=0 count=0 sjob="" job max="${TCD_MAX_REQUEUES:-3}" state=""
    if [ "${1:-}" = --run-dir ]; then run_dir="${2:?tcd_srun_requeueable --run-dir DIR CMD...}"; shift 2; fi
    [ -z "$run_dir" ] || { start=$(_tcd_newest_step "$run_dir"); state="$run_dir/.requeues"; }
    TCD_GOT_SIGNAL="" TCD_DEADLINE=""
    trap '_tcd_on_signal USR1' USR1
    trap '_tcd_on_signal TERM' TERM
    "$@" &
    pid=$!
    # `wait` returns >128 when a trapped signal interrupts it: wait again for CMD's own status (127:
    # the interrupted wait had collected it after all); after a signal, poll instead, so the job is
    # requeued before its time limit whatever the ranks do
    rc=""
    while :; do
        if [ -n "$TCD_DEADLINE" ]; then
            while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$TCD_DEADLINE" ]; do sleep 1; done
            if kill -0 "$pid" 2>/dev/null; then
                echo "tcd: the ranks did not finish saving in time (the requeue margin is reached)" >&2
                overdue=1 rc=124
                break
            fi
        fi
        TCD_INTERRUPTED=0
        wait "$pid"; st=$?
        { [ "$st" = 127 ] && [ -n "$rc" ]; } && break
        rc=$st
        { [ "$TCD_INTERRUPTED" = 1 ] && [ "$st" -gt 128 ]; } || break
    done
    trap - USR1 TERM
    job="${SLURM_JOB_ID}"
    if [ "$overdue" = 0 ] && [ "$rc" != "$TCD_REQUEUE_EXIT" ]; then
        echo "tcd: not requeueing job ${job}: the ranks exited with status ${rc} ($(_tcd_status_meaning "$rc"))" >&2
        return "$rc"
    fi
    [ -z "$run_dir" ] || now=$(_tcd_newest_step "$run_dir")
    if [ "$overdue" = 1 ] && [ "$now" -le "$start" ]; then
        if [ -n "$run_dir" ]; then
            echo "error: not requeueing job ${job}: its ranks did not return before the requeue margin and saved" \
                 "no checkpoint newer than step ${start} (a hang? see the lines above; resubmit with the same run dir)" >&2
        else
            echo "error: not requeueing job ${job}: its tasks did not return before the requeue margin" \
                 "(a hang? see the lines above)" >&2
        fi
        return "$rc"
    fi
    # requeues in a row without a new complete checkpoint, kept across requeues (same job id) in
    # <run dir>/.requeues; with no run dir, every requeue of the job counts
    if [ -z "$run_dir" ]; then
        count="${SLURM_RESTART_COUNT:-0}"
    elif [ "$now" -le "$start" ]; then
        read -r sjob count 2>/dev/null < "$state" || count=0
        [ "${sjob:-}" = "$job" ] && [[ "$count" =~ ^[0-9]+$ ]] || count=0
    fi
    if [ -z "$run_dir" ] && [ "$count" -ge "$max" ]; then
        echo "error: not requeueing job ${job}: requeued ${count} times already (TCD_MAX_REQUEUES=${max})" >&2
        return "$rc"
    elif [ -n "$run_dir" ] && [ "$now" -le "$start" ] && [ "$count" -ge "$max" ]; then
        echo "error: not requeueing job ${job}: ${count} requeues in a row without a new complete checkpoint" \
             "(newest: step ${now}; TCD_MAX_REQUEUES=${max})" >&2
        return "$rc"
    fi
    if [ -n "$run_dir" ]; then
        if [ "$now" -gt "$start" ]; then count=0; else count=$(( count + 1 )); fi
        echo "${job} ${count}" > "$state"
    fi
    local newest="${run_dir:+, newest complete checkpoint: step ${now}}"
    echo "tcd: requeueing job ${job} (restart count now ${SLURM_RESTART_COUNT:-0}; status ${rc}${newest})" >&2
    if ! scontrol requeue "$job"; then
        echo "error: scontrol requeue ${job} failed (job not requeueable? submit with --requeue)" >&2
        return 1
    fi
    # the requeue kills this shell (SIGTERM, SIGKILL after KillWait); do not start anything else
    sleep 300
    return 0
}

# tcd_train RECIPE MODE [key=value ...]: the body of every pre-training sbatch script.
#   Environment (all optional): TCD_RECIPE / TCD_MODE override the script's recipe and mode;
#   TCD_RUN_DIR (default runs/<job name>-<job id>: stable across requeues, so the rerun resumes);
#   TCD_CPU=1 (CPU-only cluster: gloo, ds_configs/cpu_zero2.json); TCD_DS_CONFIG; TCD_OVERRIDES
#   (extra key=value pairs, space-separated); TCD_LAUNCHER=srun (default: one task per GPU, ranks
#   from SLURM_PROCID/LOCALID/NTASKS, no ssh) or deepspeed (a hostfile from the allocation and
#   `deepspeed --launcher slurm`, which also starts the ranks with srun); TCD_PYTHON;
#   TCD_REQUEUE_MARGIN, TCD_MAX_REQUEUES (see tcd_srun_requeueable). Each rank gets SLURM_CPUS_PER_TASK CPUs and as
#   many OpenMP threads (OMP_NUM_THREADS, unless set). `srun --label`: every line of a rank's output
#   starts with its rank ("1: "). NCCL_DEBUG=WARN and PYTHONFAULTHANDLER=1 unless set.
tcd_train() {
    local recipe="${TCD_RECIPE:-${1:?tcd_train RECIPE MODE}}" mode="${TCD_MODE:-${2:?tcd_train RECIPE MODE}}"
    shift 2
    local repo="${TCD_REPO:-$SLURM_SUBMIT_DIR}" python="${TCD_PYTHON:-python}" ds_config
    local run_dir="${TCD_RUN_DIR:-runs/${SLURM_JOB_NAME:-tcd}-${SLURM_JOB_ID}}"
    if [ "${TCD_CPU:-0}" = 1 ]; then
        ds_config="${TCD_DS_CONFIG:-ds_configs/cpu_zero2.json}"
    else
        ds_config="${TCD_DS_CONFIG:-ds_configs/gpu_zero2_bf16.json}"
    fi
    cd "$repo" || return 1
    mkdir -p "$run_dir"
    tcd_export_dist_env || return 1
    tcd_cpus_env
    # NCCL's warnings, and every rank's Python stack on a crash or `kill -ABRT` (both unless set)
    export NCCL_DEBUG="${NCCL_DEBUG:-WARN}" PYTHONFAULTHANDLER="${PYTHONFAULTHANDLER:-1}"
    echo "tcd: job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}): ${recipe}/${mode} on ${SLURM_NTASKS} ranks" \
         "(${SLURM_JOB_NODELIST}), master ${MASTER_ADDR}:${MASTER_PORT}, ${SRUN_CPUS_PER_TASK} CPUs per rank;" \
         "watch: tensorboard --logdir ${run_dir}/tensorboard" >&2
    # shellcheck disable=SC2206  # TCD_OVERRIDES is a space-separated list of key=value words
    local args=(--config "$recipe" --mode "$mode" --deepspeed_config "$ds_config" "run_dir=$run_dir" "$@" ${TCD_OVERRIDES:-})
    if [ "${TCD_LAUNCHER:-srun}" = deepspeed ]; then
        tcd_write_hostfile "$run_dir/hostfile"
        # DeepSpeed's own `srun` line: one crashed rank ends the step (no hang until the collective
        # timeout), and every rank gets its cores
        tcd_srun_requeueable --run-dir "$run_dir" deepspeed --hostfile "$run_dir/hostfile" --launcher slurm --no_ssh_check \
            --launcher_args "--kill-on-bad-exit=1 --label --cpus-per-task=${SRUN_CPUS_PER_TASK}" \
            --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" tcd_ds/train.py "${args[@]}"
    else
        tcd_srun_requeueable --run-dir "$run_dir" srun --kill-on-bad-exit=1 --label --cpus-per-task="${SRUN_CPUS_PER_TASK}" bash -c \
            'source slurm/launch.sh && tcd_rank_env && exec "$0" -u tcd_ds/train.py "$@"' "$python" "${args[@]}"
    fi
}
