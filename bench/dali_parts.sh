#!/usr/bin/env bash
# DALI for the device machine, carried in parts (bench/README.md, "DALI"): one call carries at most 64 MiB, and
# DALI with its libraries is several hundred MB, so the wheels travel as one tar split into parts, one call each.
#
#   bench/dali_parts.sh pack WHEEL_DIR [PART_SIZE]   (here) tar WHEEL_DIR/*.whl, split it into
#                                                    dali_parts/dali.tar.part-aa, -ab, ... (default 50M each) and
#                                                    write dali_parts/SHA256: the checksum of every part and of
#                                                    the whole tar
#   bench/dali_parts.sh unpack DEST                  (device) check each part listed in dali_parts/SHA256, join
#                                                    them, check the whole, extract the wheels into DEST/ and
#                                                    print their paths, one a line
#
# unpack exits 0 when the wheels are in DEST; 3 when no part was carried at all (DALI not wanted); 1 with one
# line naming each part that is missing or corrupt (its call must be made again) when it cannot trust the set.
set -euo pipefail
cd "$(dirname "$0")/.."
PARTS_DIR="${DALI_PARTS_DIR:-dali_parts}"

pack() {
    local src=$1 size=${2:-50M} tmp
    shopt -s nullglob
    local wheels=("$src"/*.whl)
    (( ${#wheels[@]} )) || { echo "dali_parts pack: no .whl in $src" >&2; return 1; }
    tmp=$(mktemp -d)
    # plain tar of compressed wheels: gzip would gain nothing and cost minutes on both ends
    tar cf "$tmp/dali.tar" -C "$src" "${wheels[@]##*/}"
    mkdir -p "$PARTS_DIR"
    rm -f "$PARTS_DIR"/dali.tar.part-* "$PARTS_DIR/SHA256"
    split -b "$size" "$tmp/dali.tar" "$PARTS_DIR/dali.tar.part-"
    # one file a device call can carry next to any part: the parts' checksums say which call to redo
    (cd "$PARTS_DIR" && sha256sum dali.tar.part-*) > "$tmp/SHA256"
    (cd "$tmp" && sha256sum dali.tar) >> "$tmp/SHA256"
    mv "$tmp/SHA256" "$PARTS_DIR/SHA256"
    rm -rf "$tmp"
    echo "dali_parts: ${#wheels[@]} wheels -> $(ls "$PARTS_DIR"/dali.tar.part-* | wc -l) parts of at most $size in $PARTS_DIR/"
}

unpack() {
    local dest=$1 bad=0 sum name
    shopt -s nullglob
    local parts=("$PARTS_DIR"/dali.tar.part-*)
    if [[ ! -f "$PARTS_DIR/SHA256" ]]; then
        (( ${#parts[@]} )) || return 3
        echo "dali_parts: $PARTS_DIR/SHA256 was not carried: the parts cannot be checked" >&2
        return 1
    fi
    while read -r sum name; do
        [[ $name == dali.tar ]] && continue
        if [[ ! -f "$PARTS_DIR/$name" ]]; then
            echo "dali_parts: $name is missing (carry it)" >&2; bad=1
        elif [[ "$(sha256sum < "$PARTS_DIR/$name" | cut -d' ' -f1)" != "$sum" ]]; then
            echo "dali_parts: $name does not match its checksum (carry it again)" >&2; bad=1
        fi
    done < "$PARTS_DIR/SHA256"
    (( bad == 0 )) || return 1
    mkdir -p "$dest"
    rm -f "$dest"/*.whl
    # the parts in the order SHA256 lists them (split's aa, ab, ... order), not whatever else lies here
    grep -v ' dali.tar$' "$PARTS_DIR/SHA256" | awk '{print $2}' | sed "s|^|$PARTS_DIR/|" | xargs cat > "$dest/dali.tar"
    if [[ "$(sha256sum < "$dest/dali.tar" | cut -d' ' -f1)" != "$(awk '$2 == "dali.tar" {print $1}' "$PARTS_DIR/SHA256")" ]]; then
        echo "dali_parts: the joined parts do not match dali.tar's checksum" >&2
        return 1
    fi
    tar xf "$dest/dali.tar" -C "$dest"
    rm -f "$dest/dali.tar"
    printf '%s\n' "$dest"/*.whl
}

case "${1:-}" in
    pack) shift; pack "$@" ;;
    unpack) shift; unpack "$@" ;;
    *) echo "usage: $0 pack WHEEL_DIR [PART_SIZE] | unpack DEST" >&2; exit 2 ;;
esac
