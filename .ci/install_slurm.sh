#!/usr/bin/env bash
# Install a one-node SLURM (slurmctld + slurmd + client tools) and munge from Debian packages, so the
# tests marked `slurm` can start a real cluster (tests/slurm_cluster.py). No daemon is enabled or
# started here: the tests start their own munged/slurmctld/slurmd in a temp dir, and CI containers
# usually have no systemd anyway.
#
# Idempotent: does nothing when slurmctld, slurmd, munged and sbatch are already on PATH.
# Needs root (or sudo) and network access to the Debian mirrors.
#
#   bash .ci/install_slurm.sh
set -euo pipefail

# munge's daemon is `munged`; the `munge` client comes from the same package.
required=(slurmctld slurmd munged munge sbatch srun squeue scontrol sinfo)

missing=()
for bin in "${required[@]}"; do
    command -v "$bin" >/dev/null 2>&1 || missing+=("$bin")
done
# Debian puts the daemons in /usr/sbin, which a non-login root shell may lack on PATH.
if [ "${#missing[@]}" -gt 0 ]; then
    for bin in "${missing[@]}"; do
        if [ -x "/usr/sbin/$bin" ]; then
            echo "install_slurm: $bin exists at /usr/sbin/$bin but /usr/sbin is not on PATH" >&2
        fi
    done
fi

if [ "${#missing[@]}" -eq 0 ]; then
    echo "install_slurm: already installed, nothing to do ($(slurmctld -V))"
    exit 0
fi
echo "install_slurm: missing ${missing[*]}; installing slurmctld slurmd slurm-client munge"

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "install_slurm: run as root or install sudo" >&2; exit 1; }
    SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
# policy-rc.d exit 101 stops the packages' postinst from trying to start daemons (no systemd in
# containers; the tests start their own). Only added if absent, and removed again afterwards.
policy=/usr/sbin/policy-rc.d
added_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod +x "$policy"
    added_policy=1
fi
cleanup() { if [ "$added_policy" -eq 1 ]; then $SUDO rm -f "$policy"; fi; }
trap cleanup EXIT

echo "install_slurm: apt-get update"
$SUDO apt-get update -q
echo "install_slurm: apt-get install"
$SUDO apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge

still_missing=()
for bin in "${required[@]}"; do
    command -v "$bin" >/dev/null 2>&1 || still_missing+=("$bin")
done
if [ "${#still_missing[@]}" -gt 0 ]; then
    echo "install_slurm: still missing after install: ${still_missing[*]} (is /usr/sbin on PATH?)" >&2
    exit 1
fi
echo "install_slurm: installed $(slurmctld -V), munge $(munge --version 2>&1 | head -n1)"
for bin in "${required[@]}"; do
    echo "  $bin -> $(command -v "$bin")"
done
