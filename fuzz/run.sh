#!/usr/bin/env bash
# Builds the C fuzz targets with libFuzzer, AddressSanitizer and UBSan
# (clang-14, libclang-rt-14-dev) and runs each for FUZZ_SECONDS (default 60).
# Corpora are kept in fuzz/corpus/<target>/ (not committed); a crash leaves
# its input in fuzz/artifacts/.
set -euo pipefail
cd "$(dirname "$0")"
root=..
lmdb=$root/node_modules/lmdb/dependencies/lmdb/libraries/liblmdb
seconds=${FUZZ_SECONDS:-60}
out=${FUZZ_BUILD:-/tmp/nixcas-fuzz}
mkdir -p "$out" artifacts
flags=(-g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -w)
clang-14 "${flags[@]}" -DMDB_MAXKEYSIZE=0 -DMDB_USE_ROBUST -I/usr/include/node -I"$lmdb" \
  local-nar-decoders.c $root/src/native/blake3.c "$lmdb/mdb.c" "$lmdb/midl.c" -lpthread \
  -Wl,--unresolved-symbols=ignore-all -o "$out/local-nar-decoders"
clang-14 "${flags[@]}" blake3-split.c $root/src/native/blake3.c -o "$out/blake3-split"
clang-14 "${flags[@]}" -I/usr/include/node virtiofs-chains.c -o "$out/virtiofs-chains"
clang-14 "${flags[@]}" -I/usr/include/node nar-ingest.c $root/src/native/blake3.c -lzstd -lcrypto \
  -Wl,--unresolved-symbols=ignore-all -o "$out/nar-ingest"
python3 virtiofs-chains-seeds.py corpus/virtiofs-chains
python3 nar-ingest-seeds.py corpus/nar-ingest
for target in local-nar-decoders blake3-split virtiofs-chains nar-ingest; do
  mkdir -p "corpus/$target"
  echo "fuzz: $target for ${seconds}s"
  # nar-ingest needs room for a large file (past 64 KiB) and errors after it; its temp files go to
  # TMPDIR, a tmpfs here so that each large file's fsync costs nothing.
  max_len=65536
  [ "$target" = nar-ingest ] && max_len=262144
  TMPDIR=${FUZZ_TMPDIR:-/dev/shm} "$out/$target" -max_total_time="$seconds" -max_len="$max_len" -artifact_prefix=artifacts/ "corpus/$target" 2>&1 | grep -E '^#[0-9]+ *DONE|^Done|ERROR|SUMMARY' || true
  test "${PIPESTATUS[0]}" -eq 0
done
