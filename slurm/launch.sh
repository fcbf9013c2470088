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
#   tcd_master_addr                address of the first node ($TCD_MASTER_ADDR wins if set)
#   tcd_master_port                10000 + SLURM_JOB_ID % 20000 ($TCD_MASTER_PORT wins): stable
#                                  across requeues of a job, distinct for concurrent jobs, below
#                                  the Linux ephemeral range (32768+)
#   tcd_write_hostfile PATH [SLOTS]  DeepSpeed hostfile "<node> slots=N" per node of the allocation;
#                                  SLOTS defaults to SLURM_NTASKS_PER_NODE, else 1
#   tcd_export_dist_env            in the batch shell: export MASTER_ADDR, MASTER_PORT, WORLD_SIZE
#   tcd_rank_env                   inside a task (srun ... bash -c '...'): export RANK, LOCAL_RANK,
#                                  WORLD_SIZE, NODE_RANK from SLURM_PROCID/LOCALID/NTASKS/NODEID
#   tcd_srun_requeueable CMD...    preemption: run CMD (an `srun ...` line) in the background; a
#                                  SIGUSR1 to the batch shell (sbatch --signal=B:USR1@T or
#                                  `scancel --signal=USR1 --batch JOB`) is forwarded to every task
#                                  (`scancel --signal=USR1 $SLURM_JOB_ID` = all steps, not the
#                                  batch shell); the tasks checkpoint and exit; when CMD has
#                                  returned the job is requeued (`scontrol requeue $SLURM_JOB_ID`),
#                                  the rerun sees SLURM_RESTART_COUNT=1,2,...
#                                  Returns CMD's status when no USR1 came. See tests/slurm_cluster.py.

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

tcd_master_addr() {
    if [ -n "${TCD_MASTER_ADDR:-}" ]; then printf '%s\n' "$TCD_MASTER_ADDR"; return; fi
    tcd_node_addr "$(tcd_hosts | head -n1)"
}

tcd_master_port() {
    if [ -n "${TCD_MASTER_PORT:-}" ]; then printf '%s\n' "$TCD_MASTER_PORT"; return; fi
    echo $(( 10000 + ${SLURM_JOB_ID:?tcd_master_port: SLURM_JOB_ID unset} % 20000 ))
}

tcd_write_hostfile() {
    local path="${1:?tcd_write_hostfile PATH [SLOTS]}" slots="${2:-${SLURM_NTASKS_PER_NODE:-1}}" h
    slots="${slots%%(*}"   # "2(x2)" form of SLURM_TASKS_PER_NODE-like values
    : > "$path"
    for h in $(tcd_hosts); do printf '%s slots=%s\n' "$h" "$slots" >> "$path"; done
}

tcd_export_dist_env() {
    MASTER_ADDR=$(tcd_master_addr) && MASTER_PORT=$(tcd_master_port) || return 1
    export MASTER_ADDR MASTER_PORT WORLD_SIZE="${SLURM_NTASKS:-1}"
}

tcd_rank_env() {
    export RANK="${SLURM_PROCID:?tcd_rank_env: not inside a Slurm task}" \
           LOCAL_RANK="${SLURM_LOCALID:-0}" WORLD_SIZE="${SLURM_NTASKS:-1}" \
           NODE_RANK="${SLURM_NODEID:-0}"
}

TCD_GOT_USR1=0
_tcd_on_usr1() {
    TCD_GOT_USR1=1
    echo "tcd: SIGUSR1 in batch shell of job ${SLURM_JOB_ID}: forwarding to all tasks" >&2
    scancel --signal=USR1 "$SLURM_JOB_ID" || true
}

tcd_srun_requeueable() {
    local pid rc
    TCD_GOT_USR1=0
    trap _tcd_on_usr1 USR1
    "$@" &
    pid=$!
    # `wait` returns >128 when a trapped signal interrupts it: wait again until CMD really ended
    while :; do
        wait "$pid"; rc=$?
        kill -0 "$pid" 2>/dev/null || break
    done
    trap - USR1
    if [ "$TCD_GOT_USR1" = 1 ]; then
        echo "tcd: requeueing job ${SLURM_JOB_ID} (restart count now ${SLURM_RESTART_COUNT:-0})" >&2
        if ! scontrol requeue "$SLURM_JOB_ID"; then
            echo "tcd: scontrol requeue failed (job not requeueable? submit with --requeue)" >&2
            return 1
        fi
        # the requeue kills this shell (SIGTERM, SIGKILL after KillWait); do not start anything else
        sleep 300
        return 0
    fi
    return "$rc"
}

# tcd_train RECIPE MODE [key=value ...]: the body of every pre-training sbatch script.
#   Environment (all optional): TCD_RECIPE / TCD_MODE override the script's recipe and mode;
#   TCD_RUN_DIR (default runs/<job name>-<job id>: stable across requeues, so the rerun resumes);
#   TCD_CPU=1 (CPU-only cluster: gloo, ds_configs/cpu_zero2.json); TCD_DS_CONFIG; TCD_OVERRIDES
#   (extra key=value pairs, space-separated); TCD_LAUNCHER=srun (default: one task per GPU, ranks
#   from SLURM_PROCID/LOCALID/NTASKS, no ssh) or deepspeed (a hostfile from the allocation and
#   `deepspeed --launcher slurm`, which also starts the ranks with srun); TCD_PYTHON.
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
    echo "tcd: job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}): ${recipe}/${mode} on ${SLURM_NTASKS} ranks" \
         "(${SLURM_JOB_NODELIST}), master ${MASTER_ADDR}:${MASTER_PORT}; watch: tensorboard --logdir ${run_dir}/tensorboard" >&2
    # shellcheck disable=SC2206  # TCD_OVERRIDES is a space-separated list of key=value words
    local args=(--config "$recipe" --mode "$mode" --deepspeed_config "$ds_config" "run_dir=$run_dir" "$@" ${TCD_OVERRIDES:-})
    if [ "${TCD_LAUNCHER:-srun}" = deepspeed ]; then
        tcd_write_hostfile "$run_dir/hostfile"
        tcd_srun_requeueable deepspeed --hostfile "$run_dir/hostfile" --launcher slurm --no_ssh_check \
            --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" tcd_ds/train.py "${args[@]}"
    else
        tcd_srun_requeueable srun --kill-on-bad-exit=1 bash -c \
            'source slurm/launch.sh && tcd_rank_env && exec "$0" -u tcd_ds/train.py "$@"' "$python" "${args[@]}"
    fi
}
