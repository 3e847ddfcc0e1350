#!/usr/bin/env bash
# Installs tapstream on a tap host: the binary, a system user, the configuration (only if
# none is there), the systemd unit, and the Prometheus and Grafana files.
#
#   sudo deploy/install.sh [--binary PATH] [--root DIR] [--dry-run]
#
#   --binary PATH  the tapstream binary (default: target/release/tapstream)
#   --root DIR     install under DIR instead of / (for packaging and tests); no user is
#                  created and systemd is not touched
#   --dry-run      print what would be done, change nothing
#
# Run it again to upgrade: the binary, unit and shared files are replaced, the configuration
# is kept.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
binary="$here/target/release/tapstream"
root=""
dry_run=0

die() { echo "install.sh: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --binary) [ $# -ge 2 ] || die "--binary needs a path"; binary=$2; shift 2 ;;
        --root) [ $# -ge 2 ] || die "--root needs a directory"; root=${2%/}; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done

[ -x "$binary" ] || die "no tapstream binary at $binary (build it with: cargo build --release -p tapstream, or give --binary)"
[ -f "$here/config/tapstream.toml" ] || die "config/tapstream.toml is missing from $here"
if [ -n "$root" ]; then
    [ -d "$root" ] || die "--root $root is not a directory"
elif [ "$(id -u)" != 0 ]; then
    die "run as root (or with --root DIR to install into a directory)"
fi

run() {
    if [ $dry_run = 1 ]; then echo "would run: $*"; else "$@"; fi
}

# install FILE DEST MODE
put() {
    run install -D -m "$3" "$1" "$root$2"
}

put "$binary" /usr/local/bin/tapstream 0755
put "$here/deploy/systemd/tapstream.service" /etc/systemd/system/tapstream.service 0644
put "$here/deploy/prometheus/prometheus.yml" /usr/local/share/tapstream/prometheus/prometheus.yml 0644
put "$here/deploy/prometheus/tapstream-alerts.yml" /usr/local/share/tapstream/prometheus/tapstream-alerts.yml 0644
put "$here/deploy/grafana/tapstream-dashboard.json" /usr/local/share/tapstream/grafana/tapstream-dashboard.json 0644
put "$here/deploy/iam-policy.json" /usr/local/share/tapstream/iam-policy.json 0644
put "$here/deploy/iam-reader-policy.json" /usr/local/share/tapstream/iam-reader-policy.json 0644
put "$here/README.md" /usr/local/share/doc/tapstream/README.md 0644
put "$here/docs/tuning.md" /usr/local/share/doc/tapstream/tuning.md 0644

if [ -e "$root/etc/tapstream/tapstream.toml" ]; then
    echo "keeping the existing $root/etc/tapstream/tapstream.toml"
else
    put "$here/config/tapstream.toml" /etc/tapstream/tapstream.toml 0640
fi

if [ -z "$root" ]; then
    if ! getent group tapstream >/dev/null; then
        run groupadd --system tapstream
    fi
    if ! getent passwd tapstream >/dev/null; then
        run useradd --system --gid tapstream --home-dir /var/lib/tapstream --no-create-home \
            --shell /usr/sbin/nologin --comment "tapstream capture daemon" tapstream
    fi
    run chgrp tapstream /etc/tapstream/tapstream.toml
    run systemctl daemon-reload
fi

cat <<NEXT
Installed. Next:
  1. Edit $root/etc/tapstream/tapstream.toml: the interface alias and device, [limits], and
     [store] destinations (s3://bucket/prefix); check it with
       tapstream check-config /etc/tapstream/tapstream.toml
  2. S3 credentials: an instance profile, or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in
     /etc/tapstream/aws.env (mode 0600). The IAM policy a capture host needs is in
     /usr/local/share/tapstream/iam-policy.json; the one for those who run tapstream ls
     and read (list and get, nothing else) in iam-reader-policy.json beside it.
  3. Let operators ask for captures: usermod -aG tapstream <user>
  4. systemctl enable --now tapstream; then: tapstream capture start --wait -i <alias> --duration 1m
  5. Tune the host: /usr/local/share/doc/tapstream/tuning.md. Scrape metrics with
     /usr/local/share/tapstream/prometheus/prometheus.yml.
NEXT
