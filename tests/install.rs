//! `scripts/install.sh` (what `make install` runs) gives a tree that works after it is moved:
//! installs the library this test run was built with into a temporary prefix (through
//! DESTDIR), moves the tree elsewhere, checks that no installed ELF file points outside it
//! (RUNPATH/RPATH all `$ORIGIN`-relative, SONAME libconvoy.so.1, every dependency of
//! libconvoy resolved inside the tree or to system libraries), then builds a C program with
//! nothing but `pkg-config --cflags --libs convoy` (and `convoy-static`) and runs it with an
//! empty environment on the real model.
#![cfg(target_os = "linux")] // ELF tools (readelf, patchelf, ldd); the macOS install path is untested
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Uses only functions whose signatures are stable (the structs are changing elsewhere).
const PROGRAM: &str = r#"
#include <stdio.h>
#include <string.h>
#include "convoy.h"

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: prog MODEL\n"); return 2; }
    const char *version = convoy_version();
    const char *backend = convoy_backend();
    if (version == NULL || backend == NULL) { fprintf(stderr, "NULL version/backend\n"); return 3; }
    if (strcmp(version, CONVOY_VERSION) != 0) {
        fprintf(stderr, "library %s, header %s\n", version, CONVOY_VERSION);
        return 4;
    }
    convoy_engine *engine = NULL;
    convoy_status status = convoy_engine_create(argv[1], NULL, &engine);
    if (status != CONVOY_STATUS_OK || engine == NULL) {
        fprintf(stderr, "convoy_engine_create: status %d\n", (int)status);
        return 5;
    }
    unsigned context = (unsigned)convoy_engine_context_length(engine);
    convoy_engine_destroy(engine);
    if (context == 0) { fprintf(stderr, "context length 0\n"); return 6; }
    printf("version=%s backend=%s context=%u\n", version, backend, context);
    return 0;
}
"#;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Fails (never skips) when a tool that scripts/setup.sh installs is missing.
fn require_tool(name: &str, arg: &str) {
    let ok = Command::new(name)
        .arg(arg)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "`{name}` is missing: run scripts/setup.sh (make test does) to install it"
    );
}

fn checked(what: &str, out: Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// `sh -c SCRIPT` in `dir` with nothing from this process's environment but PATH: the
/// compiler finds convoy only through PKG_CONFIG_PATH.
fn build_with_pkg_config(dir: &Path, pkgconfig: &Path, package: &str, exe: &str) -> PathBuf {
    let script = format!("cc -std=c11 prog.c $(pkg-config --cflags --libs {package}) -o {exe}");
    let out = Command::new("sh")
        .arg("-c")
        .arg(&script)
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("PKG_CONFIG_PATH", pkgconfig)
        .output()
        .unwrap();
    checked(&script, out);
    dir.join(exe)
}

/// Runs the program with an empty environment (no LD_LIBRARY_PATH) on the real model.
fn run_program(exe: &Path, extra_env: &[(&str, &str)]) -> Output {
    let out = Command::new(exe)
        .arg(common::model_path())
        .env_clear()
        .envs(extra_env.iter().copied())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} failed ({}):\n{}",
        exe.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let expected = format!(
        "version={} backend={} context=",
        env!("CARGO_PKG_VERSION"),
        env!("CONVOY_MLX_BACKEND")
    );
    assert!(stdout.starts_with(&expected), "{stdout}");
    out
}

fn readelf_dynamic(file: &Path) -> String {
    checked(
        "readelf -d",
        Command::new("readelf")
            .arg("-d")
            .arg(file)
            .output()
            .unwrap(),
    )
}

/// The bracketed values of the dynamic entries of one kind (NEEDED, RUNPATH, ...).
fn dynamic_entries(dynamic: &str, kind: &str) -> Vec<String> {
    let tag = format!("({kind})");
    dynamic
        .lines()
        .filter(|l| l.contains(&tag))
        .filter_map(|l| {
            let start = l.find('[')? + 1;
            Some(l[start..l.rfind(']')?].to_owned())
        })
        .collect()
}

/// Every regular file under `dir` that is an ELF object (not symlinks, not .a archives).
fn elf_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        if meta.is_dir() {
            elf_files(&path, found);
        } else if meta.is_file() {
            let mut magic = [0u8; 4];
            let n =
                std::io::Read::read(&mut std::fs::File::open(&path).unwrap(), &mut magic).unwrap();
            if n == 4 && magic == *b"\x7fELF" {
                found.push(path);
            }
        }
    }
}

/// What `ldd` resolves each dependency of `file` to, with an empty environment.
fn ldd(file: &Path) -> String {
    checked(
        "ldd",
        Command::new("ldd").arg(file).env_clear().output().unwrap(),
    )
}

fn resolved<'a>(ldd: &'a str, name: &str) -> &'a str {
    ldd.lines()
        .find(|l| l.trim_start().starts_with(&format!("{name} => ")))
        .unwrap_or_else(|| panic!("ldd lists no {name}:\n{ldd}"))
}

#[test]
fn installed_tree_moves_and_builds_programs_with_only_pkg_config() {
    for (tool, arg) in [
        ("pkg-config", "--version"),
        ("cc", "--version"),
        ("readelf", "--version"),
        ("patchelf", "--version"),
        ("ldd", "--version"),
    ] {
        require_tool(tool, arg);
    }
    let built = common::lib_dir();
    for name in ["libconvoy.so", "libconvoy.a"] {
        assert!(
            built.join(name).is_file(),
            "{} is missing: `cargo test` builds only the rlib; run `cargo build --lib` first \
             (make test does)",
            built.join(name).display()
        );
    }

    // Install under DESTDIR, as a package build would, then move the tree somewhere else.
    let tmp = tempfile::tempdir().unwrap();
    let stage = tmp.path().join("stage");
    let out = Command::new(root().join("scripts/install.sh"))
        .arg("--lib-dir")
        .arg(&built)
        .args(["--prefix", "/opt/convoy", "--destdir"])
        .arg(&stage)
        .output()
        .unwrap();
    eprintln!("{}", checked("scripts/install.sh", out));
    let installed = stage.join("opt/convoy");
    let tree = tmp.path().join("elsewhere/convoy-moved");
    std::fs::create_dir_all(tree.parent().unwrap()).unwrap();
    std::fs::rename(&installed, &tree).unwrap();
    assert!(!installed.exists());
    let lib = tree.join("lib");
    for f in [
        "include/convoy.h",
        "lib/libconvoy.a",
        "lib/pkgconfig/convoy.pc",
        "lib/pkgconfig/convoy-static.pc",
        "lib/convoy/mlx-runtime/mlx/lib/libmlx.so",
    ] {
        assert!(tree.join(f).is_file(), "{f} not installed");
    }

    // libconvoy.so -> libconvoy.so.1, whose SONAME is libconvoy.so.1 and whose RUNPATH is
    // relative to itself, OpenBLAS (when the build uses it) ahead of MLX.
    assert_eq!(
        std::fs::read_link(lib.join("libconvoy.so")).unwrap(),
        Path::new("libconvoy.so.1")
    );
    let dynamic = readelf_dynamic(&lib.join("libconvoy.so.1"));
    assert_eq!(dynamic_entries(&dynamic, "SONAME"), ["libconvoy.so.1"]);
    let uses_openblas = dynamic_entries(&dynamic, "NEEDED").contains(&"libopenblas.so.0".into());
    let expected_runpath = if uses_openblas {
        "$ORIGIN/convoy/openblas:$ORIGIN/convoy/mlx-runtime/mlx/lib"
    } else {
        "$ORIGIN/convoy/mlx-runtime/mlx/lib"
    };
    assert_eq!(dynamic_entries(&dynamic, "RUNPATH"), [expected_runpath]);
    assert!(dynamic_entries(&dynamic, "RPATH").is_empty());

    // No installed ELF file searches an absolute folder (the build tree, the MLX cache, the
    // system OpenBLAS folder): every RUNPATH/RPATH entry is relative to the file.
    let mut elves = Vec::new();
    elf_files(&tree, &mut elves);
    assert!(elves.len() >= 2, "ELF files found: {elves:?}");
    let cache = common::cache_dir();
    for file in &elves {
        let dynamic = readelf_dynamic(file);
        for kind in ["RUNPATH", "RPATH"] {
            for value in dynamic_entries(&dynamic, kind) {
                for entry in value.split(':') {
                    assert!(
                        entry.starts_with("$ORIGIN")
                            && !entry.contains(root().to_str().unwrap())
                            && !entry.contains(cache.to_str().unwrap()),
                        "{} has {kind} entry {entry:?} (not relative to $ORIGIN)",
                        file.display()
                    );
                }
            }
        }
    }

    // Every dependency of libconvoy resolves: MLX and OpenBLAS inside the moved tree.
    let deps = ldd(&lib.join("libconvoy.so.1"));
    assert!(!deps.contains("not found"), "{deps}");
    let tree_str = tree.to_str().unwrap();
    assert!(resolved(&deps, "libmlx.so").contains(tree_str), "{deps}");
    if uses_openblas {
        assert!(
            resolved(&deps, "libopenblas.so.0").contains(tree_str),
            "{deps}"
        );
    }

    // A C program built with only `pkg-config --cflags --libs convoy`, run without any
    // environment: it loads libconvoy from the moved tree and creates an engine.
    let work = tmp.path().join("program");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(work.join("prog.c"), PROGRAM).unwrap();
    let pkgconfig = lib.join("pkgconfig");
    let shared = build_with_pkg_config(&work, &pkgconfig, "convoy", "prog-shared");
    let deps = ldd(&shared);
    assert!(!deps.contains("not found"), "{deps}");
    assert!(
        resolved(&deps, "libconvoy.so.1").contains(tree_str),
        "{deps}"
    );
    if uses_openblas {
        // BLAS calls of MLX's bundled reference BLAS/LAPACK land in the bundled OpenBLAS.
        let out = run_program(&shared, &[("LD_DEBUG", "bindings")]);
        let log = String::from_utf8_lossy(&out.stderr);
        let sgemm: Vec<&str> = log
            .lines()
            .filter(|l| l.ends_with("normal symbol `sgemm_'"))
            .collect();
        assert!(
            !sgemm.is_empty()
                && sgemm
                    .iter()
                    .all(|l| l.contains("/openblas/libopenblas.so.0")),
            "sgemm_ does not resolve in the bundled OpenBLAS: {sgemm:?}"
        );
    }
    run_program(&shared, &[]);

    // The same program linked statically against libconvoy.a with convoy-static.pc.
    let statik = build_with_pkg_config(&work, &pkgconfig, "convoy-static", "prog-static");
    let needed = dynamic_entries(&readelf_dynamic(&statik), "NEEDED");
    assert!(
        !needed.iter().any(|n| n.starts_with("libconvoy")),
        "{needed:?}"
    );
    let deps = ldd(&statik);
    assert!(!deps.contains("not found"), "{deps}");
    assert!(resolved(&deps, "libmlx.so").contains(tree_str), "{deps}");
    run_program(&statik, &[]);
}
