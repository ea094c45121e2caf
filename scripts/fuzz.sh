#!/usr/bin/env bash
# scripts/fuzz.sh: run the cargo-fuzz targets of fuzz/ for a bounded time each.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]     default: 60 s, every target
#
# Needs a nightly toolchain (`rustup toolchain install nightly`) and cargo-fuzz
# (`cargo install cargo-fuzz`). Inputs that find new coverage go to
# fuzz/target/corpus/<target>; the seeds committed in fuzz/corpus/<target> are only read.
# A crash, a leak, a malloc over 64 MB or an input slower than 10 s is saved under
# fuzz/artifacts/<target> and fails the script; reproduce it with
#   cargo +nightly fuzz run <target> fuzz/artifacts/<target>/<file>
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

seconds=${1:-60}
shift || true
if (($# > 0)); then
  targets=("$@")
else
  mapfile -t targets < <(cargo +nightly fuzz list)
fi

for target in "${targets[@]}"; do
  out="fuzz/target/corpus/$target"
  mkdir -p "$out" "fuzz/corpus/$target"
  printf '==> fuzz %s for %ss\n' "$target" "$seconds"
  # 65536: PGFANOUT_MAX_FRAME_BYTES' default, larger than any NOTIFY payload (8000).
  cargo +nightly fuzz run "$target" "$out" "fuzz/corpus/$target" -- \
    -max_total_time="$seconds" -max_len=65536 -timeout=10 \
    -rss_limit_mb=1024 -malloc_limit_mb=64 -print_final_stats=1
done
