#!/usr/bin/env bash
# Builds every fuzz target once and runs each for SECONDS; fails if any target crashes.
#
#   fuzz/run.sh SECONDS [TARGET...]
#
# Installs what it needs if missing: the nightly toolchain (cargo-fuzz needs -Z flags) and
# cargo-fuzz itself (from crates.io, --locked). New inputs the fuzzer finds go to
# fuzz/corpus-run/<target>/ (ignored by git); the committed seeds in fuzz/corpus/<target>/ are
# only read. A crashing input is written to fuzz/artifacts/<target>/ and named in the output.
set -euo pipefail
seconds=${1:?usage: fuzz/run.sh SECONDS [TARGET...]}
shift
cd "$(dirname "$0")"
export CARGO_INCREMENTAL=0

# -O: optimised, as the code runs in production; -a: debug assertions and overflow checks, so
# arithmetic overflow in a decoder is a finding. -s none: no AddressSanitizer. Every decoder
# under test is safe Rust, where ASan finds nothing the bounds checks do not; it would halve
# the executions per second and lengthen the build. SANITIZER=address restores it.
flags=(-O -a -s "${SANITIZER:-none}")

if ! rustup toolchain list | grep -q '^nightly'; then
    rustup toolchain install nightly --profile minimal
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

started=$(date +%s)
cargo +nightly fuzz build "${flags[@]}"
echo "fuzz build: $(( $(date +%s) - started ))s"

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo +nightly fuzz list)
fi

failed=()
for target in "${targets[@]}"; do
    mkdir -p "corpus-run/$target"
    args=(-max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1)
    if [ -f "dict/$target.dict" ]; then
        args+=(-dict="dict/$target.dict")
    fi
    echo "== $target (${seconds}s)"
    if ! cargo +nightly fuzz run "${flags[@]}" "$target" \
        "corpus-run/$target" "corpus/$target" -- "${args[@]}" 2>"corpus-run/$target.log"; then
        tail -n 40 "corpus-run/$target.log"
        failed+=("$target")
        continue
    fi
    # libFuzzer's last status line: executions, coverage (cov) and features (ft).
    grep -E '^#[0-9]+.*(DONE|pulse)' "corpus-run/$target.log" | tail -n 1 || true
    grep -E '^stat::(number_of_executed_units|average_exec_per_sec)' "corpus-run/$target.log" || true
done

echo "fuzz total: $(( $(date +%s) - started ))s"
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz: crash or error in: ${failed[*]} (inputs under fuzz/artifacts/)" >&2
    exit 1
fi
