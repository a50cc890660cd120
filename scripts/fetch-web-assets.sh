#!/usr/bin/env bash
# The dashboard's third-party JavaScript (xterm.js and its fit addon; noVNC's client, ES modules),
# from the npm registry, into
# orchestrator/static/vendor/ (gitignored: built, never committed). Pinned versions, each
# tarball checked against its registry integrity (sha512) before anything is unpacked. The API
# serves these files itself (GET /dashboard/assets/{name}): no CDN at runtime. They are package
# data of the wheel (pyproject), so the sandbox image, which installs the wheel, carries them.
#
# Idempotent: when vendor/ holds the files of exactly these pins, unchanged since they were
# unpacked (SHA256SUMS, written after the integrity check), nothing is downloaded.
#
#   scripts/fetch-web-assets.sh            ensure the files are there
#   scripts/fetch-web-assets.sh --check    exit 1 if they are missing or stale (no download)
set -euo pipefail
cd "$(dirname "$0")/.."

REGISTRY=${ORCH_NPM_REGISTRY:-https://registry.npmjs.org}
VENDOR=orchestrator/static/vendor
# package  version  integrity (the registry's dist.integrity)  files (tarball path:vendor name;
# a path ending in / is a tree, copied whole with its layout: noVNC's modules import each other
# by relative paths, core/ -> ../vendor/pako/lib/, so they are served as they are laid out)
PINS=(
  "@xterm/xterm 6.0.0 sha512-TQwDdQGtwwDt+2cgKDLn0IRaSxYu1tSUjgKarSDkUM0ZNiSRXFpjxEsvc/Zgc5kq5omJ+V0a8/kIM2WD3sMOYg== package/lib/xterm.js:xterm.js,package/css/xterm.css:xterm.css,package/LICENSE:xterm.LICENSE"
  "@xterm/addon-fit 0.11.0 sha512-jYcgT6xtVYhnhgxh3QgYDnnNMYTcf8ElbxxFzX0IZo+vabQqSPAjC3c1wJrKB5E19VwQei89QCiZZP86DCPF7g== package/lib/addon-fit.js:addon-fit.js,package/LICENSE:addon-fit.LICENSE"
  "@novnc/novnc 1.7.0 sha512-ucEJOx4T2avIRCleodk7YobZj5O2Ga2AeLfQ69A/yjG9HHba2+PDgwSkN3FttrmG+70ZGx21sElNFouK13RzyA== package/core/:novnc/core/,package/vendor/pako/lib/:novnc/vendor/pako/lib/,package/LICENSE.txt:novnc.LICENSE,package/vendor/pako/LICENSE:pako.LICENSE"
)

log() { printf '[web-assets] %s\n' "$*" >&2; }
die() { printf '[web-assets] error: %s\n' "$*" >&2; exit 1; }

# What vendor/ must record to be current: the pins themselves.
stamp() { printf '%s\n' "${PINS[@]}"; }

current() {
  [ -f "$VENDOR/PINS" ] && [ -f "$VENDOR/SHA256SUMS" ] || return 1
  [ "$(cat "$VENDOR/PINS")" = "$(stamp)" ] || return 1
  (cd "$VENDOR" && sha256sum --quiet -c SHA256SUMS >/dev/null 2>&1)
}

if current; then exit 0; fi
[ "${1:-}" = "--check" ] && die "$VENDOR is missing or stale: run scripts/fetch-web-assets.sh"

work=$(mktemp -d "${TMPDIR:-/tmp}/web-assets.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/out"
for pin in "${PINS[@]}"; do
  read -r package version integrity files <<<"$pin"
  tarball="$work/$(basename "$package")-$version.tgz"
  url="$REGISTRY/$package/-/$(basename "$package")-$version.tgz"
  log "downloading $package@$version"
  curl -fsSL --retry 3 --max-time 120 -o "$tarball" "$url" || die "downloading $url failed"
  got="sha512-$(openssl dgst -sha512 -binary "$tarball" | base64 -w0)"
  [ "$got" = "$integrity" ] || die "$package@$version: integrity $got, expected $integrity"
  mkdir -p "$work/$package"
  IFS=, read -r -a pairs <<<"$files"
  members=()
  for pair in "${pairs[@]}"; do members+=("${pair%%:*}"); done
  tar -xzf "$tarball" -C "$work/$package" "${members[@]}"
  for pair in "${pairs[@]}"; do
    from="$work/$package/${pair%%:*}" to="$work/out/${pair##*:}"
    case $from in
      */) [ -d "$from" ] || die "$package@$version has no ${pair%%:*}"
          mkdir -p "$to" && cp -r "$from." "$to" ;;
      *) cp "$from" "$to" ;;
    esac
  done
done
# Every file, trees' too, by its path under vendor/ (what the API's allow-list reads).
(cd "$work/out" && find . -type f -printf '%P\n' | LC_ALL=C sort | xargs -d '\n' sha256sum -- > ../SHA256SUMS)
mv "$work/SHA256SUMS" "$work/out/SHA256SUMS"
stamp > "$work/out/PINS"
# Replace vendor/ whole: no file of an older pin stays behind.
rm -rf "$VENDOR"
mkdir -p "$(dirname "$VENDOR")"
cp -r "$work/out" "$VENDOR"
log "$VENDOR: $(cd "$VENDOR" && ls | grep -v -e SHA256SUMS -e PINS | tr '\n' ' ')($(grep -c . "$VENDOR/SHA256SUMS") files)"
