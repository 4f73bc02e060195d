# nixcas for Nix users, without nixpkgs: the package, and microVM tests as derivations.
#
#   nix-build nix -A nixcas                 # result/bin/nixcas
#   nix-build nix -A tests                  # every test below
#   nix-build nix -A tests.storeBinary
#
# Every host program is an argument. The defaults are Debian 12's paths (nix-bin,
# qemu-system-x86, linux-image-amd64, busybox-static, nodejs); each may also be given
# as a package (a NixOS user passes pkgs.qemu, pkgs.nodejs_20, pkgs.pkgsStatic.busybox,
# and a kernel with its modules). `npm ci` must have run in the repository first: the
# package is what it built (dist/, build/, node_modules/). Builds need
# `--option sandbox false` (QEMU, /dev, the host programs). nix/README.md says more.
{ system ? builtins.currentSystem
, bash ? "/bin/bash"
  # A directory holding cp, mkdir, chmod, cat, rm, head: coreutils' bin.
, coreutils ? "/usr/bin"
, node ? "/usr/bin/node"
, qemu ? "/usr/bin/qemu-system-x86_64"
  # A statically linked busybox (the guest has no libc).
, busybox ? "/bin/busybox"
  # A kernel image and its modules directory (/lib/modules/VERSION); null: the newest
  # Debian kernel in /boot with modules.
, kernel ? null
, kernelModules ? null
  # Where xz is (the kernel image is unpacked on the host) and, for the nar-bridge test, nix.
, xz ? "/usr/bin/xz"
, nixBin ? "/usr/bin"
  # Any string: part of every test derivation, so that a new one runs the tests again instead of
  # finding them built (test/nix-vmtest.test.ts gives one per run).
, salt ? ""
}:

let
  # A host program given as a path, or a package: its bin/NAME.
  program = pkg: name: if builtins.isString pkg || builtins.isPath pkg then toString pkg else "${pkg}/bin/${name}";
  dirOf' = pkg: if builtins.isString pkg || builtins.isPath pkg then toString pkg else "${pkg}/bin";
  sh = program bash "bash";
  nodeBin = program node "node";
  coreutilsBin = dirOf' coreutils;
  xzDir = builtins.dirOf (program xz "xz");
  version = (builtins.fromJSON (builtins.readFile ../package.json)).version;

  # The packages package-lock.json does not mark as development-only: what nixcas runs with.
  runtimePackages = builtins.listToAttrs (map (key: { name = key; value = true; })
    (builtins.filter (key: key != "" && !((builtins.fromJSON (builtins.readFile ../package-lock.json)).packages.${key}.dev or false))
      (builtins.attrNames (builtins.fromJSON (builtins.readFile ../package-lock.json)).packages)));
  # Whether node_modules/… path `rel` belongs to a runtime package (or leads to one: a scope directory).
  isRuntimeModule = rel: type:
    let
      parts = builtins.filter builtins.isString (builtins.split "/" rel);
      prefixes = builtins.genList (n: builtins.concatStringsSep "/" (builtins.genList (i: builtins.elemAt parts i) (n + 1))) (builtins.length parts);
    in
    rel == "node_modules"
    || builtins.any (p: runtimePackages ? ${p}) prefixes
    || (type == "directory" && builtins.any (key: builtins.substring 0 (builtins.stringLength rel + 1) key == "${rel}/") (builtins.attrNames runtimePackages));

  # Files in packages that nothing loads at run time (types, source maps, documents): left out,
  # since Nix copies every file of the source at each evaluation.
  noRuntimeUse = rel: builtins.match ".*(\\.d\\.ts|\\.d\\.mts|\\.d\\.cts|\\.map|\\.md|\\.markdown|/LICENSE[^/]*|/CHANGELOG[^/]*)" rel != null;

  # What `npm ci` made: the bundle, the native addons, the runtime packages (not the development
  # ones: every evaluation reads and hashes what is here), the schemas.
  source = builtins.path {
    name = "nixcas-${version}-source";
    path = ../.;
    filter = path: type:
      let
        rel = builtins.substring (builtins.stringLength (toString ../.) + 1) (-1) (toString path);
        under = dir: rel == dir || builtins.substring 0 (builtins.stringLength dir + 1) rel == "${dir}/";
      in
      !(under "build/Release/obj.target")
      && (if under "node_modules" then isRuntimeModule rel type && !(type == "regular" && noRuntimeUse rel)
          else builtins.any under [ "dist" "build" "protos" "package.json" ]);
  };

  nixcas = derivation {
    name = "nixcas-${version}";
    inherit system;
    builder = sh;
    src = source;
    args = [ "-e" (builtins.toFile "install-nixcas.sh" ''
      PATH=${coreutilsBin}
      for need in dist/cli/nixcas.cjs dist/vmtest/run-vm-test.cjs build/Release/nixcas_native.node node_modules; do
        if [ ! -e "$src/$need" ]; then
          echo "nixcas: $need is missing from the repository: run \`npm ci\` there before nix-build" >&2
          exit 1
        fi
      done
      mkdir -p "$out/lib/nixcas" "$out/bin"
      cp -r "$src/dist" "$src/build" "$src/node_modules" "$src/protos" "$src/package.json" "$out/lib/nixcas/"
      printf '#!%s\nexec %s %s "$@"\n' ${sh} ${nodeBin} "$out/lib/nixcas/dist/cli/nixcas.cjs" > "$out/bin/nixcas"
      chmod +x "$out/bin/nixcas"
    '') ];
  };

  # A file in the store holding `text`, executable (a test script).
  writeScript = name: text: derivation {
    inherit name system text;
    builder = sh;
    args = [ "-c" ''printf '%s' "$text" > "$out" && ${coreutilsBin}/chmod +x "$out"'' ];
  };

  # The environment run-vm-test reads the host programs from.
  vmEnv = {
    NIXCAS_VMTEST_QEMU = program qemu "qemu-system-x86_64";
    NIXCAS_VMTEST_BUSYBOX = program busybox "busybox";
  } // (if kernel == null then { } else {
    NIXCAS_VMTEST_KERNEL = toString kernel;
    NIXCAS_VMTEST_MODULES = toString kernelModules;
  });

  # Boots a microVM that sees exactly the closure of `paths` (and the script) at /nix/store and
  # runs `script` there (with sh, or its own #! interpreter from the store). The output holds
  # the guest's console `log`, the script's `status` and `timings.json`; the build fails when the
  # script fails or the guest does not finish within `timeout` seconds. `seed` chooses how the
  # closure reaches the store: "copy" (nixcas copy of exportReferencesGraph) or "nar-bridge"
  # (nix copy --to a nixcas nar-bridge).
  #
  # `substitutes`: paths put into a binary cache (file://, signed) that `nixcas virtiofs` gets as
  # its --substituter, and not into the store: the guest sees them appear on lookup. Name them in
  # the script without their string context (builtins.unsafeDiscardStringContext), or they join
  # the script's closure. Like the nar-bridge seed, this runs nix copy: a root build.
  #
  # `accel`: "tcg" (everywhere), or "kvm" where /dev/kvm works (the build user must be able to open it).
  mkVMTest = { name, paths ? closure, closure ? [ ], script, timeout ? 300, memory ? 512, seed ? "copy", virtiofsFlags ? [ ], substitutes ? [ ], accel ? "tcg" }:
    let scriptFile = writeScript "${name}-script" script; in
    derivation (vmEnv // {
      name = "vmtest-${name}";
      inherit system timeout memory seed virtiofsFlags salt substitutes;
      NIXCAS_VMTEST_ACCEL = accel;
      builder = sh;
      __structuredAttrs = true;
      exportReferencesGraph.closure = paths ++ [ scriptFile ];
      script = scriptFile;
      # Inline, not a builtins.toFile: it names the nixcas package, a derivation's output.
      args = [ "-e" "-c" ''
        source "$NIX_BUILD_TOP/.attrs.sh"
        export PATH=${coreutilsBin}:${xzDir}:${nixBin} HOME="$NIX_BUILD_TOP"
        store="$NIX_BUILD_TOP/store"
        nixcas=${nixcas}/bin/nixcas
        flags=("''${virtiofsFlags[@]}")
        if [ "$seed" = nar-bridge ] || [ ''${#substitutes[@]} -gt 0 ]; then
          # `nix copy` reads the host's Nix database, which a build user (nixbld*) may not open.
          if [ "$(id -u)" != 0 ]; then
            echo "vmtest-$name: it runs nix copy inside the build, which needs the build to run as root: nix-build --option build-users-group ''' …" >&2
            exit 1
          fi
        fi
        if [ ''${#substitutes[@]} -gt 0 ]; then
          # A signed binary cache only the substituter knows of.
          nix-store --generate-binary-cache-key vmtest-cache-1 "$NIX_BUILD_TOP/cache.sk" "$NIX_BUILD_TOP/cache.pk"
          nix --extra-experimental-features nix-command copy --to "file://$NIX_BUILD_TOP/cache?secret-key=$NIX_BUILD_TOP/cache.sk" "''${substitutes[@]}"
          flags+=(--substituter "file://$NIX_BUILD_TOP/cache" --trusted-public-key "$(cat "$NIX_BUILD_TOP/cache.pk")")
        fi
        if [ "$seed" = nar-bridge ]; then
          # Through Nix's own uploader: the bridge on a free loopback port, the closure copied to it.
          nix-store --generate-binary-cache-key vmtest-1 "$NIX_BUILD_TOP/key.sk" "$NIX_BUILD_TOP/key.pk"
          "$nixcas" nar-bridge --store "$store" --listen 127.0.0.1:0 --allow-upload --sign-key "$NIX_BUILD_TOP/key.sk" 2> "$NIX_BUILD_TOP/bridge.log" &
          bridge=$!
          trap 'kill $bridge 2>/dev/null || true' EXIT
          for _ in $(seq 100); do grep -q 'listening on' "$NIX_BUILD_TOP/bridge.log" && break; sleep 0.1; done
          port=$(grep -o 'listening on [^ ]*' "$NIX_BUILD_TOP/bridge.log" | head -n1 | sed 's/.*://')
          [ -n "$port" ] || { cat "$NIX_BUILD_TOP/bridge.log" >&2; exit 1; }
          nix --extra-experimental-features nix-command copy --to "http://127.0.0.1:$port" \
            $(${nodeBin} -e 'for (const e of require(process.argv[1]).closure) console.log(e.path)' "$NIX_BUILD_TOP/.attrs.json")
          kill $bridge; wait $bridge 2>/dev/null || true
          trap - EXIT
        else
          "$nixcas" copy --store "$store" "$NIX_BUILD_TOP/.attrs.json"
        fi
        exec ${nodeBin} ${nixcas}/lib/nixcas/dist/vmtest/run-vm-test.cjs --nixcas ${nixcas}/lib/nixcas/dist/cli/nixcas.cjs \
          --store "$store" --script "$script" --out "''${outputs[out]}" --timeout "$timeout" --memory "$memory" -- "''${flags[@]}"
      '' ];
    });

  # A static busybox as a store path, so that the guest runs a program from the store.
  busyboxInStore = derivation {
    name = "busybox-static";
    inherit system;
    builder = sh;
    args = [ "-c" "${coreutilsBin}/mkdir -p $out/bin && ${coreutilsBin}/cp ${program busybox "busybox"} $out/bin/busybox && ${coreutilsBin}/ln -s busybox $out/bin/sh" ];
  };
  greeting = derivation {
    name = "greeting";
    inherit system;
    builder = sh;
    args = [ "-c" "${coreutilsBin}/mkdir -p $out/share && echo 'hello from the store' > $out/share/greeting && echo ${busyboxInStore} > $out/share/uses" ];
  };

  onlyInCache = derivation {
    name = "only-in-cache";
    inherit system;
    builder = sh;
    args = [ "-c" "${coreutilsBin}/mkdir -p $out/share && echo 'only in a binary cache' > $out/share/where" ];
  };

  tests = {
    # A closure of a few paths: a store binary runs, files are checked.
    storeBinary = mkVMTest {
      name = "store-binary";
      paths = [ greeting ];
      script = ''
        set -e
        ${busyboxInStore}/bin/busybox echo "busybox from the store runs"
        test "$(cat ${greeting}/share/greeting)" = "hello from the store"
        test "$(cat ${greeting}/share/uses)" = "${busyboxInStore}"
        ls /nix/store
      '';
    };
    # The script's interpreter is in the store.
    storeInterpreter = mkVMTest {
      name = "store-interpreter";
      paths = [ busyboxInStore ];
      script = ''
        #!${busyboxInStore}/bin/sh
        echo "running under $0's interpreter from the store"
        test -x ${busyboxInStore}/bin/busybox
      '';
    };
    # A path only a binary cache has appears in the guest when it is looked up (substitution).
    substituted = mkVMTest {
      name = "substituted";
      paths = [ busyboxInStore ];
      substitutes = [ onlyInCache ];
      script = ''
        set -e
        test "$(cat ${builtins.unsafeDiscardStringContext "${onlyInCache}"}/share/where)" = "only in a binary cache"
      '';
    };
    # The closure reaches the store through `nix copy --to` a nixcas nar-bridge.
    seededThroughBridge = mkVMTest {
      name = "seeded-through-bridge";
      paths = [ greeting ];
      seed = "nar-bridge";
      script = ''
        set -e
        test "$(cat ${greeting}/share/greeting)" = "hello from the store"
        ${busyboxInStore}/bin/busybox true
      '';
    };
  };

  # Tests whose build must fail (the suite checks that it does): not part of `tests`.
  failingTests = {
    # A guest that never finishes: killed after its timeout.
    hangs = mkVMTest {
      name = "hangs";
      paths = [ greeting ];
      timeout = 8;
      script = ''
        echo "this guest hangs on purpose"
        sleep 1000
      '';
    };
    scriptFails = mkVMTest {
      name = "script-fails";
      paths = [ greeting ];
      script = ''
        echo "this test fails on purpose"
        exit 3
      '';
    };
  };
in
{
  inherit nixcas tests failingTests;
  lib = { inherit mkVMTest writeScript; };
}
