#!/bin/sh
# Debian packages the test suite uses, installed only when missing.
#
#   chromium        headless screenshot of the demo transcript (tests/e2e/test_demo.py)
#   tesseract-ocr   OCR of that screenshot (same test)
#   fonts-noto-color-emoji  so the buttons' emoji render in that screenshot instead of empty boxes
#   postgresql      server binaries initdb/pg_ctl for a throwaway server (tests/db, tests/bench)
#
# As root with apt-get: runs `apt-get update` once, then installs what is missing
# (--no-install-recommends). Otherwise it only prints what is missing and exits 0: the tests that
# need a missing tool skip with a reason. Idempotent, and silent when everything is there.
# SYSTEM_DEPS_SKIP=1 does nothing (for machines where the suite must not touch the system).
set -eu

[ "${SYSTEM_DEPS_SKIP:-}" = "1" ] && exit 0

have() { command -v "$1" >/dev/null 2>&1; }

have_pg() {
    { have initdb && have pg_ctl; } && return 0
    for d in /usr/lib/postgresql/*/bin; do
        [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && return 0
    done
    return 1
}

have_tesseract() {
    # the binary and its English data (tesseract-ocr pulls in tesseract-ocr-eng)
    have tesseract && tesseract --list-langs 2>/dev/null | grep -qx eng
}

have_emoji_font() {
    if have fc-list; then
        fc-list 2>/dev/null | grep -qi "color emoji"
    else
        [ -e /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ]
    fi
}

missing=""
have chromium || missing="$missing chromium"
have_tesseract || missing="$missing tesseract-ocr tesseract-ocr-eng"
have_emoji_font || missing="$missing fonts-noto-color-emoji"
have_pg || missing="$missing postgresql"

[ -z "$missing" ] && exit 0

if [ "$(id -u)" -ne 0 ] || ! have apt-get; then
    echo "system-deps: missing Debian packages:$missing" >&2
    echo "system-deps: not root with apt-get, so not installing them; tests that need them will skip." >&2
    echo "system-deps: to install: sudo apt-get install --no-install-recommends$missing" >&2
    exit 0
fi

echo "system-deps: installing$missing"
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends $missing; } >"$log" 2>&1; then
    tail -n 20 "$log" >&2
    echo "system-deps: apt-get failed; tests that need$missing will skip." >&2
fi
exit 0
