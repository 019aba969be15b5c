#!/usr/bin/env bash
# Install the peers `make bench` measures ato against (Debian's packages): restic and borg.
# Only the benchmark needs them; `make test` does not install them. Idempotent.
set -euo pipefail
need=()
command -v restic >/dev/null 2>&1 || need+=(restic)
command -v borg >/dev/null 2>&1 || need+=(borgbackup)
command -v zstd >/dev/null 2>&1 || need+=(zstd)
command -v b3sum >/dev/null 2>&1 || need+=(b3sum)
command -v curl >/dev/null 2>&1 || need+=(curl)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = "0" ]; then SUDO=""; elif command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
  echo "bench-deps: missing ${need[*]} and no root/sudo to install them" >&2; exit 1; fi
echo "bench-deps: installing ${need[*]}" >&2
APT=(apt-get -o DPkg::Lock::Timeout=900 -o Acquire::Retries=3)
$SUDO "${APT[@]}" update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive $SUDO "${APT[@]}" install -y -qq --no-install-recommends "${need[@]}" >/dev/null
