{
  "targets": [
    {
      "target_name": "nixcas_native",
      "sources": ["src/native/nixcas_native.c", "src/native/blake3.c", "src/native/virtiofs_fast.c"],
      "cflags": ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"]
    },
    {
      # LMDB from the sources lmdb-js ships, built with lmdb-js's own defines (its
      # binding.gyp: MDB_MAXKEYSIZE=0, MDB_USE_ROBUST), so that the lock file and
      # data format are the ones lmdb-js writes. Its warnings are not ours to fix.
      "target_name": "lmdb_of_lmdb_js",
      "type": "static_library",
      "sources": [
        "node_modules/lmdb/dependencies/lmdb/libraries/liblmdb/mdb.c",
        "node_modules/lmdb/dependencies/lmdb/libraries/liblmdb/midl.c"
      ],
      "defines": ["MDB_MAXKEYSIZE=0", "MDB_USE_ROBUST"],
      "cflags": ["-O2", "-fPIC", "-fvisibility=hidden", "-w"]
    },
    {
      # The native NAR renderer for the local store (src/store/nar/native/local-nar.c).
      "target_name": "nixcas_nar",
      "dependencies": ["lmdb_of_lmdb_js"],
      "sources": ["src/store/nar/native/local-nar.c", "src/native/blake3.c"],
      "include_dirs": ["node_modules/lmdb/dependencies/lmdb/libraries/liblmdb"],
      "defines": ["MDB_MAXKEYSIZE=0", "MDB_USE_ROBUST"],
      "cflags": ["-O2", "-pthread", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-format-truncation"],
      "ldflags": ["-pthread"]
    },
    {
      # The zstd decoder for substituted NARs (src/native/zstd.c), where libzstd's header is
      # installed (Debian: libzstd-dev); without it an empty module is built and the zstd
      # program decodes instead.
      "target_name": "nixcas_zstd",
      "conditions": [
        ["<!(test -f /usr/include/zstd.h && echo 1 || echo 0)==1", {
          "sources": ["src/native/zstd.c"],
          "libraries": ["-lzstd"],
          "cflags": ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"]
        }, {
          "type": "none"
        }]
      ]
    },
    {
      # Substituted NARs decoded, hashed, parsed and written on libuv's pool
      # (src/store/nar/native/nar-ingest.c). SHA-256 is Node's own OpenSSL, whose symbols the node
      # binary exports. Built where libzstd's header is; without it the TypeScript reader ingests.
      "target_name": "nixcas_ingest",
      "conditions": [
        ["<!(test -f /usr/include/zstd.h && echo 1 || echo 0)==1", {
          "sources": ["src/store/nar/native/nar-ingest.c", "src/native/blake3.c"],
          "libraries": ["-lzstd"],
          "cflags": ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-format-truncation"]
        }, {
          "type": "none"
        }]
      ]
    }
  ]
}
