#!/usr/bin/env bash
# Runs every fuzz target (or the ones named) for SECONDS each, one after
# another, on the stable toolchain:
#
#   fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]
#
# cargo-fuzz asks for nightly only for `-Z` flags; RUSTC_BOOTSTRAP lets the
# stable compiler accept them, and `--sanitizer none` drops the one flag
# (-Zsanitizer) whose runtime is nightly-only. The SanitizerCoverage passes
# that guide libFuzzer are plain -C/-Cllvm-args options, so the search stays
# coverage-guided (the log's cov:/ft: counts grow). SANITIZER=address brings
# ASan back where a nightly toolchain is at hand.
#
# Each target keeps its corpus in fuzz/corpus/<target> (grown across runs,
# not committed) and also reads the committed seeds in fuzz/seeds/<target>.
# A crash leaves its input in fuzz/artifacts/<target>/ and makes the script
# exit 1 after the remaining targets ran.
set -uo pipefail

cd "$(dirname "$0")"
secs=${1:-60}
shift || true
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
sanitizer=${SANITIZER:-none}
triple=$(rustc -vV | sed -n 's/^host: //p')

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz is missing: cargo install cargo-fuzz" >&2
    exit 2
fi

if [ $# -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

# -a: debug assertions and overflow checks, so arithmetic the decoders get
# wrong panics instead of wrapping silently.
for t in "${targets[@]}"; do
    cargo fuzz build -O -a --sanitizer "$sanitizer" --target-dir "$CARGO_TARGET_DIR" "$t" >&2 || exit 2
done

failed=0
summary=()
for t in "${targets[@]}"; do
    bin="$CARGO_TARGET_DIR/$triple/release/$t"
    corpus="corpus/$t"
    art="artifacts/$t"
    mkdir -p "$corpus" "$art"
    seeds=()
    [ -d "seeds/$t" ] && seeds=("seeds/$t")
    log="$art/fuzz.log"
    echo "== $t: ${secs}s" >&2
    # -timeout: an input that takes 10 s is a hang, reported like a crash.
    # -rss_limit_mb: a decoder that allocates what a length field claims
    # instead of what arrived fails here.
    nice -n 19 "$bin" "$corpus" "${seeds[@]}" \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
        -artifact_prefix="$art/" -print_final_stats=1 >"$log" 2>&1
    rc=$?
    last=$(grep -E '^#[0-9]+' "$log" | tail -1)
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    cov=$(sed -nE 's/.* cov: ([0-9]+).*/\1/p' <<<"$last")
    ft=$(sed -nE 's/.* ft: ([0-9]+).*/\1/p' <<<"$last")
    files=$(find "$corpus" -type f | wc -l)
    bytes=$(du -sb "$corpus" | cut -f1)
    crashes=$(find "$art" -type f ! -name fuzz.log | wc -l)
    if [ "$rc" -ne 0 ] || [ "$crashes" -ne 0 ]; then
        failed=1
        grep -m1 -E 'panicked|ERROR: libFuzzer' "$log" >&2
        echo "   crash input(s) in fuzz/$art/; log: fuzz/$log" >&2
    fi
    line=$(printf '%-26s runs %10s  cov %5s  ft %6s  corpus %5s files %8s B  crashes %s' \
        "$t" "${runs:-?}" "${cov:-?}" "${ft:-?}" "$files" "$bytes" "$crashes")
    echo "$line"
    summary+=("$line")
done

echo "== summary (${secs}s per target)"
printf '%s\n' "${summary[@]}"
exit "$failed"
