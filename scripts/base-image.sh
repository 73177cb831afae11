#!/usr/bin/env bash
# Makes sure the container engine has debian:bookworm-slim, the base of every image (Dockerfile.*).
# Pulled when a registry serves it; otherwise built from the Debian archive with mmdebstrap, slimmed
# the way Debian's own slim images are (no docs, man pages, locales, apt lists; apt keeps no .deb
# after installing: the docker-clean file those images carry), and imported under the same name, so the unchanged Dockerfiles build. The engine's storage keeps it: later runs on the
# same machine reuse it (delete it with `podman rmi debian:bookworm-slim` to rebuild).
# Usage: scripts/base-image.sh podman|docker
set -euo pipefail
engine=${1:?usage: $0 podman|docker}
image=docker.io/library/debian:bookworm-slim

if "$engine" image inspect "$image" >/dev/null 2>&1; then
  exit 0
fi
if timeout 60 "$engine" pull -q "$image" >/dev/null 2>&1; then
  exit 0
fi
echo "$image cannot be pulled: building a stand-in from the Debian archive (mmdebstrap)" >&2
if ! command -v mmdebstrap >/dev/null; then
  echo "mmdebstrap is missing: scripts/system-deps.sh images installs it (make images runs that)" >&2
  exit 1
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mirror=${DEBIAN_MIRROR:-http://deb.debian.org}
mmdebstrap --quiet --variant=minbase \
  --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
  --aptopt='Acquire::Languages "none"' \
  --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-exclude=/usr/share/info/*' \
  --customize-hook='cat > "$1"/etc/apt/apt.conf.d/docker-clean <<CLEAN
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
CLEAN' \
  --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/var/cache/apt/archives/*.deb "$1"/var/log/*.log "$1"/var/log/apt/*' \
  bookworm "$work/rootfs.tar" \
  "deb $mirror/debian bookworm main" \
  "deb $mirror/debian bookworm-updates main" \
  "deb $mirror/debian-security bookworm-security main"
"$engine" import --change 'CMD ["bash"]' "$work/rootfs.tar" "$image" >/dev/null
echo "built $image from the Debian archive" >&2
