{
  "targets": [
    {
      "target_name": "nixcas_native",
      "sources": ["src/native/nixcas_native.c"],
      "cflags": ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"]
    }
  ]
}
