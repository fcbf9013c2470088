#!/usr/bin/env bash
# Idempotent installer of a local Slurm + MUNGE for CI (Debian 12 / bookworm: Slurm 22.05).
#
#   bash slurm/setup_ci_slurm.sh        # as root (or with sudo available)
#
# Installs the Debian packages `slurm-wlm` (slurmctld, slurmd, slurm-client) and `munge`
# with --no-install-recommends. Exits 0 immediately when the binaries are already present;
# runs `apt-get update` only when a package is missing. Output is quiet; the elapsed time
# is printed at the end. The services are NOT started here: tests/slurm_cluster.py starts
# its own munged/slurmctld/slurmd under a temp dir.
set -euo pipefail

start=$(date +%s.%N)
_ver() { dpkg-query -W -f='slurm ${Version}' slurm-wlm 2>/dev/null || echo 'slurm ?'; }
need=(slurmctld slurmd munged sbatch srun scontrol sinfo squeue scancel mungekey)
missing=0
for b in "${need[@]}"; do
    command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || { missing=1; break; }
done
if [ "$missing" = 0 ]; then
    echo "setup_ci_slurm: slurm-wlm and munge already installed ($(_ver))"
    exit 0
fi

SUDO=""
if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "setup_ci_slurm: must run as root (or have sudo)" >&2; exit 1; }
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp /tmp/setup_ci_slurm.XXXXXX.log)
run() { "$@" >>"$log" 2>&1 || { echo "setup_ci_slurm: failed: $* (log follows)" >&2; tail -n 50 "$log" >&2; exit 1; }; }

pkgs=(slurm-wlm munge)
# apt-get update only when the package lists do not know the packages (fresh image).
if ! apt-cache show "${pkgs[@]}" >/dev/null 2>&1; then
    run $SUDO apt-get update -qq
fi
if ! $SUDO apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >>"$log" 2>&1; then
    # stale lists (404 on a superseded .deb): refresh and retry once
    run $SUDO apt-get update -qq
    run $SUDO apt-get install -y -qq --no-install-recommends "${pkgs[@]}"
fi
rm -f "$log"
end=$(date +%s.%N)
printf 'setup_ci_slurm: installed %s (%s) in %.1f s\n' "${pkgs[*]}" "$(_ver)" "$(awk -v a="$start" -v b="$end" 'BEGIN{print b-a}')"
