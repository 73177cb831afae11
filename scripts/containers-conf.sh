#!/usr/bin/env bash
# Prints a containers.conf for podman on this machine: runc with cgroupfs (crun fails on a hybrid
# cgroup layout), and default ulimits at or below the hard limits of the calling shell, which podman's
# defaults exceed on machines with low limits (then no container starts). Used by scripts/images.sh
# and the container tests (CONTAINERS_CONF).
set -euo pipefail
nofile=$(ulimit -Hn)
[ "$nofile" = unlimited ] && nofile=1048576
cat <<CONF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=4096:4096"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
