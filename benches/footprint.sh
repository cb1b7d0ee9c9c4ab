#!/bin/sh
# The appliance footprint: binary size and the idle server's memory, for
# the builds the README's "Appliance builds" lists. Prints one Markdown
# table. Needs the musl target and rust-src for the last rows
# (`rustup target add x86_64-unknown-linux-musl`, `rustup component add
# rust-src`); rows whose toolchain part is missing are printed as skipped.
#
#   sh benches/footprint.sh
set -u
cd "$(dirname "$0")/.."
T=target/footprint
GNU=x86_64-unknown-linux-gnu
MUSL=x86_64-unknown-linux-musl
ALL=""
MIN="--no-default-features --features cli"

# build NAME TARGET STD FEATURES: cargo build into $T/NAME; STD=std rebuilds
# the standard library with panics that abort at once (no message code).
build() {
    name=$1 target=$2 std=$3 features=$4
    if [ "$std" = std ]; then
        RUSTC_BOOTSTRAP=1 RUSTFLAGS="-Zunstable-options -Cpanic=immediate-abort" \
            cargo build -q --profile release-small --target "$target" --target-dir "$T/$name" \
            -Z build-std=std,panic_abort $features
    else
        cargo build -q --profile release-small --target "$target" --target-dir "$T/$name" $features
    fi
}

# measure NAME TARGET: size of the binary; RSS, PSS, private dirty memory and
# threads of the idle server one second after start-up.
measure() {
    bin="$T/$1/$2/release-small/slabsocks"
    size=$(( $(stat -c %s "$bin") / 1024 ))
    "$bin" --listen 127.0.0.1:0 --log-level error &
    pid=$!
    sleep 1
    rss=$(awk '/^VmRSS/ {print $2}' /proc/$pid/status)
    threads=$(awk '/^Threads/ {print $2}' /proc/$pid/status)
    pss=$(awk '/^Pss:/ {print $2}' /proc/$pid/smaps_rollup)
    dirty=$(awk '/^Private_Dirty:/ {print $2}' /proc/$pid/smaps_rollup)
    kill "$pid"
    wait "$pid" 2>/dev/null
    echo "| $1 | $size KiB | $rss KiB | $pss KiB | $dirty KiB | $threads |"
}

echo "| build | binary | RSS idle | PSS idle | private dirty | threads |"
echo "|---|---|---|---|---|---|"
for row in "gnu-all $GNU - ALL" "gnu-min $GNU - MIN" "musl-all $MUSL - ALL" \
           "gnu-all-std $GNU std ALL" "musl-all-std $MUSL std ALL" "musl-min-std $MUSL std MIN"; do
    set -- $row
    eval features=\$$4
    if build "$1" "$2" "$3" "$features" 2>"$T.err"; then
        measure "$1" "$2"
    else
        echo "| $1 | skipped: $(tail -n 1 "$T.err") | | | | |"
    fi
done
