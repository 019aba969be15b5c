#!/usr/bin/env bash
# make demo: the main job, end to end, printing what ato did at each step:
#   build the sample capsule -> serve the embedded registry -> publish -> install -> run.
# Everything lives under .demo/ (its own ATO_HOME and HOME), so it never touches ~/.ato.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
ATO="$ROOT/.venv/bin/ato"
PY="$ROOT/.venv/bin/python"
DEMO="$ROOT/.demo"
export HOME="$DEMO/home" ATO_HOME="$DEMO/home/.ato" SOURCE_DATE_EPOCH=0
export XDG_DATA_HOME="$HOME/.local/share"
REGISTRY_PID=""
cleanup() {
  [ -n "$REGISTRY_PID" ] && kill "$REGISTRY_PID" 2>/dev/null || true
  "$ATO" close --all >/dev/null 2>&1 || true
}
trap cleanup EXIT
rm -rf "$DEMO" && mkdir -p "$HOME"
# bold headings on a terminal only (not in a log, not under NO_COLOR), like ato's own output
if [ -t 1 ] && [ -z "${NO_COLOR:-}" ] && [ "${TERM:-}" != dumb ]; then B=$'\033[1m' R=$'\033[0m'; else B='' R=''; fi
say() { printf '\n%s== %s%s\n' "$B" "$*" "$R"; }
field() { "$PY" -c "import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2], {}, {'d': d}))" "$@"; }
free_port() { "$PY" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }

cp -r demo/hello "$DEMO/hello"
SITE_PORT=$(free_port)
sed -i "s/^port = .*/port = $SITE_PORT/" "$DEMO/hello/capsule.toml"

say "ato $("$ATO" --version | cut -d' ' -f2): build the sample capsule ($DEMO/hello)"
"$ATO" build "$DEMO/hello" --json > "$DEMO/build.json"
ARTIFACT=$(field "$DEMO/build.json" "d['artifact']")
echo "artifact:        $ARTIFACT"
echo "artifact_blake3: $(field "$DEMO/build.json" "d['artifact_blake3']")"
echo "payload:         $(field "$DEMO/build.json" "d['payload']['files']") files in $(field "$DEMO/build.json" "d['payload']['chunks']") CAS chunk(s)"
tar tvf "$ARTIFACT"

say "rebuild without changes: every task is up to date"
"$ATO" build "$DEMO/hello" --explain

say "same inputs in another directory: a byte-identical artifact"
cp -r "$DEMO/hello" "$DEMO/hello-copy"
"$ATO" build "$DEMO/hello-copy" --json > "$DEMO/build-copy.json"
echo "first:  $(field "$DEMO/build.json" "d['artifact_blake3']")"
echo "second: $(field "$DEMO/build-copy.json" "d['artifact_blake3']")"
[ "$(field "$DEMO/build.json" "d['artifact_blake3']")" = "$(field "$DEMO/build-copy.json" "d['artifact_blake3']")" ]

say "serve the embedded registry (ato registry serve --host 127.0.0.1 --port 0 --auth-token pwd)"
"$ATO" registry serve --host 127.0.0.1 --port 0 --auth-token pwd --data-dir "$DEMO/registry" \
  > "$DEMO/registry.out" 2> "$DEMO/registry.err" &
REGISTRY_PID=$!
for _ in $(seq 100); do grep -qo 'http://127.0.0.1:[0-9]*' "$DEMO/registry.out" 2>/dev/null && break; sleep 0.1; done
REGISTRY=$(grep -o 'http://127.0.0.1:[0-9]*' "$DEMO/registry.out" | head -1)
[ -n "$REGISTRY" ] || { cat "$DEMO/registry.err" >&2; exit 1; }
echo "registry: $REGISTRY (web UI at $REGISTRY/)"

say "publish: ATO_TOKEN=pwd ato publish --artifact ... --registry $REGISTRY"
ATO_TOKEN=pwd "$ATO" publish --artifact "$ARTIFACT" --registry "$REGISTRY"

say "publishing the same version again is refused (E202) ..."
if ATO_TOKEN=pwd "$ATO" publish --artifact "$ARTIFACT" --registry "$REGISTRY"; then exit 1; fi
say "... unless it is the same artifact and --allow-existing says a retry is fine"
ATO_TOKEN=pwd "$ATO" publish --artifact "$ARTIFACT" --registry "$REGISTRY" --deploy --allow-existing

say "search and install: ato install local/hello-ato --registry $REGISTRY"
"$ATO" search hello --registry "$REGISTRY"
"$ATO" install local/hello-ato --registry "$REGISTRY"

say "run it in the background: ato run local/hello-ato --registry $REGISTRY --yes --background"
"$ATO" run local/hello-ato --registry "$REGISTRY" --yes --background
for _ in $(seq 100); do "$PY" -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$SITE_PORT/', timeout=1)" 2>/dev/null && break; sleep 0.1; done
echo "GET http://127.0.0.1:$SITE_PORT/ ->"
"$PY" -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:$SITE_PORT/', timeout=5).read().decode().strip())"
"$ATO" ps
"$ATO" close --all

say "check every object in the CAS"
"$ATO" cas verify

say "a bad manifest fails closed with a one-line error"
mkdir -p "$DEMO/broken" && printf 'name = "x"\nversion = \n' > "$DEMO/broken/capsule.toml"
if "$ATO" build "$DEMO/broken"; then echo "expected a failure" >&2; exit 1; fi

say "demo finished: everything is under .demo/ (ATO_HOME=$ATO_HOME)"
