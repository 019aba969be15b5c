#!/usr/bin/env bash
# make demo: build the sample capsule and show what ato did, step by step.
# Uses its own ATO_HOME under .demo/ so it never touches ~/.ato.
set -euo pipefail
cd "$(dirname "$0")/.."
ATO=.venv/bin/ato
PY=.venv/bin/python
export ATO_HOME="$PWD/.demo/ato-home"
export SOURCE_DATE_EPOCH=0
rm -rf .demo && mkdir -p .demo
cp -r demo/hello .demo/hello
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
field() { $PY -c "import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2], {}, {'d': d}))" "$@"; }

say "ato $($ATO --version | cut -d' ' -f2): build the sample capsule (.demo/hello)"
$ATO build .demo/hello --json > .demo/build1.json
echo "artifact:        $(field .demo/build1.json "d['artifact']")"
echo "artifact_blake3: $(field .demo/build1.json "d['artifact_blake3']")"
echo "payload:         $(field .demo/build1.json "d['payload']['files']") files, $(field .demo/build1.json "d['payload']['chunks']") chunk(s) stored in the CAS"
tar tvf "$(field .demo/build1.json "d['artifact']")"

say "rebuild without changes: doit finds every task up to date"
$ATO build .demo/hello --explain

say "same inputs, another directory: byte-identical artifact"
cp -r demo/hello .demo/hello-copy
$ATO build .demo/hello-copy --json > .demo/build2.json
echo "first:  $(field .demo/build1.json "d['artifact_blake3']")"
echo "second: $(field .demo/build2.json "d['artifact_blake3']")"
[ "$(field .demo/build1.json "d['artifact_blake3']")" = "$(field .demo/build2.json "d['artifact_blake3']")" ]

say "change one file: only the payload and artifact are redone"
echo '<p>edited</p>' >> .demo/hello/static/index.html
$ATO build .demo/hello --explain

say "what the capsule needs to run"
$ATO inspect requirements .demo/hello --json

say "check every object in the CAS"
$ATO cas verify

say "a bad manifest fails closed with a one-line error"
mkdir -p .demo/broken && printf 'name = "x"\nversion = \n' > .demo/broken/capsule.toml
if $ATO build .demo/broken; then echo "expected a failure" >&2; exit 1; fi

say "demo finished: state is in .demo/ (ATO_HOME=$ATO_HOME)"
