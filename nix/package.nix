# nixcas for nixpkgs users: `pkgs.callPackage ./nix/package.nix { }`.
#
# buildNpmPackage with importNpmLock: every dependency is fetched by the integrity hash
# package-lock.json already records, so there is no npmDepsHash to keep in step with the lock
# file (nixpkgs 24.05 or later). node-gyp builds the two native addons (src/native/) against
# nodejs; libzstd gives the in-process zstd decoder (without it nixcas runs the zstd program).
# Not built on the project's own machines (they have no nixpkgs): nix/README.md says what is checked.
{ lib, buildNpmPackage, importNpmLock, nodejs_20, python3, pkg-config, zstd }:

buildNpmPackage {
  pname = "nixcas";
  version = (lib.importJSON ../package.json).version;

  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../package.json ../package-lock.json ../binding.gyp ../tsconfig.json
      ../src ../protos ../scripts ../vmtest ../README.md
    ];
  };

  nodejs = nodejs_20;
  npmDeps = importNpmLock { npmRoot = ../.; };
  npmConfigHook = importNpmLock.npmConfigHook;

  nativeBuildInputs = [ python3 pkg-config ];
  buildInputs = [ zstd ];

  # `npm run build`: tsc, then the esbuild bundle (dist/). The native addons were built by
  # npm's install step (node-gyp) and ship as build/Release/*.node (package.json "files").
  npmBuildScript = "build";

  meta = {
    description = "A content-addressed Nix store served over virtio-fs, FUSE, gRPC and HTTP";
    license = lib.licenses.mit;
    mainProgram = "nixcas";
    platforms = lib.platforms.linux;
  };
}
