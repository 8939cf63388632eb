#!/usr/bin/env bash
# Fuzzes logchannel's decoders for a bounded time.
#
#   logchannel/fuzz/run.sh [SECONDS]     (default 60)
#
# Exits non-zero if the fuzzer finds a crash; the input that caused it is
# left in logchannel/fuzz/artifacts/decode_log/.
set -euo pipefail

seconds="${1:-60}"
if ! [[ "$seconds" =~ ^[0-9]+$ ]] || [ "$seconds" -eq 0 ]; then
    echo "usage: $0 [SECONDS]  (a whole number of seconds, default 60)" >&2
    exit 2
fi

cd "$(dirname "$0")"

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

# cargo-fuzz builds with nightly-only flags (-Zsanitizer=address and
# friends). Only the stable toolchain is available here; RUSTC_BOOTSTRAP=1
# makes it accept them, and the sanitizer runtimes ship with stable's
# rust-std.
RUSTC_BOOTSTRAP=1 exec cargo fuzz run decode_log -- -max_total_time="$seconds"
