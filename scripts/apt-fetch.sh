#!/usr/bin/env bash
# Download Debian packages by name into a cache directory, safely:
#  - one fetch at a time per directory (flock on DIR/.lock), so tests that need the same
#    package can run this at once;
#  - every .deb is checked against the size and SHA256 that apt's package index gives
#    (`apt-get download --print-uris`); a file that does not match is deleted, never used;
#  - a failed or corrupt download is retried (APT_FETCH_TRIES, default 4, with
#    APT_FETCH_DELAY seconds between tries, default 5).
# Prints the path of each verified .deb, one per line, in the order asked.
# Usage: scripts/apt-fetch.sh DIR PACKAGE...
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 DIR PACKAGE..." >&2
  exit 2
fi
dir=$1
shift
tries=${APT_FETCH_TRIES:-4}
delay=${APT_FETCH_DELAY:-5}
command -v apt-get >/dev/null || { echo "apt-fetch: needs apt-get (Debian or a derivative)" >&2; exit 1; }
mkdir -p "$dir"
exec 9>"$dir/.lock"
flock 9

# verify FILE SIZE SHA256: 0 when FILE exists with exactly that size and hash.
verify() {
  [ -f "$1" ] || return 1
  [ "$(stat -c %s "$1")" = "$2" ] || return 1
  [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$3" ] || return 1
}

for pkg in "$@"; do
  uri=$(apt-get download --print-uris "$pkg" 2>/dev/null | grep "^'" | head -1 || true)
  if [ -z "$uri" ]; then
    echo "apt-fetch: apt knows no package '$pkg' (run apt-get update?)" >&2
    exit 1
  fi
  # 'URL' FILE SIZE SHA256:HASH
  read -r _ file size hash <<<"$uri"
  hash=${hash#SHA256:}
  if ! [[ "$size" =~ ^[0-9]+$ ]] || ! [[ "$hash" =~ ^[0-9a-f]{64}$ ]]; then
    echo "apt-fetch: apt gave no size and SHA256 for $pkg: $uri" >&2
    exit 1
  fi
  if ! verify "$dir/$file" "$size" "$hash"; then
    ok=0
    for ((i = 1; i <= tries; i++)); do
      rm -f "$dir/$file" "$dir/$file.FAILED"
      if (cd "$dir" && apt-get download "$pkg") >"$dir/.log" 2>&1 && verify "$dir/$file" "$size" "$hash"; then
        ok=1
        break
      fi
      got="missing"
      [ -f "$dir/$file" ] && got="$(stat -c %s "$dir/$file") bytes, SHA256 $(sha256sum "$dir/$file" | cut -d' ' -f1)"
      echo "apt-fetch: $pkg: try $i of $tries failed (want $size bytes, SHA256 $hash; got $got): $(grep -v '^W: Download is performed unsandboxed' "$dir/.log" | tail -2 | tr '\n' ' ')" >&2
      rm -f "$dir/$file" "$dir/$file.FAILED"
      [ "$i" -lt "$tries" ] && sleep "$delay"
    done
    if [ "$ok" != 1 ]; then
      echo "apt-fetch: could not download a verified $pkg after $tries tries" >&2
      exit 1
    fi
  fi
  echo "$dir/$file"
done
