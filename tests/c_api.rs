//! Compiles C programs that include only `include/convoy.h` (as C11 and as C++17, warnings as
//! errors), links them against the shared and the static library, and runs them on the real
//! model. Also checks that the committed header equals a fresh cbindgen generation.
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// target/<profile>, where cargo put libconvoy.{so,a} for this test run.
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_owned()
}

fn compile(compiler: &str, std: &str, src: &Path, out: &Path, static_link: bool) {
    compile_full(compiler, std, src, out, static_link, &[]);
}

/// Compiles against the shared library with extra flags first (e.g. another include dir).
fn compile_with(compiler: &str, std: &str, src: &Path, out: &Path, extra: &[String]) {
    compile_full(compiler, std, src, out, false, extra);
}

fn compile_full(
    compiler: &str,
    std: &str,
    src: &Path,
    out: &Path,
    static_link: bool,
    extra: &[String],
) {
    let lib = lib_dir();
    for name in ["libconvoy.a", "libconvoy.so"] {
        assert!(
            lib.join(name).exists(),
            "{} is missing: `cargo test` builds only the rlib; run `cargo build --lib` first (make test does)",
            lib.join(name).display()
        );
    }
    let mlx = env!("CONVOY_MLX_LIB_DIR");
    let mut cmd = Command::new(compiler);
    cmd.args([std, "-Wall", "-Wextra", "-Werror", "-pedantic", "-O1", "-g"])
        .args(extra)
        .arg(format!("-I{}", root().join("include").display()));
    if compiler.contains("++") {
        cmd.args(["-x", "c++"]);
    }
    cmd.arg(src).arg("-x").arg("none").arg("-o").arg(out);
    if static_link {
        cmd.arg(lib.join("libconvoy.a"));
        if let Some(blas) = option_env!("CONVOY_OPENBLAS_DIR") {
            cmd.arg(format!("-L{blas}"))
                .arg("-lopenblas")
                .arg(format!("-Wl,-rpath,{blas}"));
        }
        cmd.arg(format!("-L{mlx}"))
            .args(["-lmlx", "-lstdc++", "-lm", "-ldl", "-lpthread"]);
        // convoy's CPU matmul kernel (x86-64 builds) runs in OpenMP threads.
        if cfg!(all(target_os = "linux", target_arch = "x86_64")) {
            cmd.arg("-lgomp");
        }
    } else {
        cmd.arg(format!("-L{}", lib.display()))
            .arg("-lconvoy")
            .arg("-lpthread");
        cmd.arg(format!("-Wl,-rpath,{}", lib.display()));
    }
    cmd.arg(format!("-Wl,-rpath,{mlx}"));
    let out = cmd.output().expect("run the C compiler");
    assert!(
        out.status.success(),
        "{compiler} {std} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn run(exe: &Path, full: bool) {
    let model = common::model_path();
    let mut cmd = Command::new(exe);
    cmd.arg(&model);
    if full {
        cmd.arg("full");
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{} failed", exe.display());
    assert!(stdout.contains(" passed, 0 failed"));
}

#[test]
fn c11_program_against_the_shared_library() {
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("api_test_c_shared");
    compile(
        "cc",
        "-std=c11",
        &root().join("tests/c/api_test.c"),
        &exe,
        false,
    );
    run(&exe, true);
}

#[test]
fn cxx17_program_against_the_static_library() {
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("api_test_cxx_static");
    compile(
        "c++",
        "-std=c++17",
        &root().join("tests/c/api_test.c"),
        &exe,
        true,
    );
    run(&exe, false);
}

/// Issue 7's regressions (cancel mid-prefill, several pollers, release, odd bools) through
/// the C API, as C11 against the shared library; as C++17 against the static one (built).
#[test]
fn regressions_through_the_c_api() {
    let dir = tempfile::tempdir().unwrap();
    let src = root().join("tests/c/regressions.c");
    let exe = dir.path().join("regressions_c_shared");
    compile("cc", "-std=c11", &src, &exe, false);
    compile(
        "c++",
        "-std=c++17",
        &src,
        &dir.path().join("regressions_cxx_static"),
        true,
    );
    run(&exe, false);
}

/// A host that exits with an engine mid-work (no destroy) exits cleanly, at any moment.
/// Before the exit hook about 1 run in 5 crashed in MLX's destructors; 20 runs (two at a
/// time) would all pass with the bug back less than 2% of the time.
#[test]
fn exiting_with_a_running_engine_is_clean() {
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("exit_without_destroy");
    compile(
        "cc",
        "-std=c11",
        &root().join("tests/c/exit_without_destroy.c"),
        &exe,
        false,
    );
    let model = common::model_path();
    let runs: Vec<(u64, &str)> = (0..20u64)
        .map(|i| (i * 230 % 3600, if i % 2 == 0 { "exit" } else { "return" }))
        .collect();
    for pair in runs.chunks(2) {
        let children: Vec<_> = pair
            .iter()
            .map(|(ms, how)| {
                let child = Command::new(&exe)
                    .arg(&model)
                    .arg(ms.to_string())
                    .arg(how)
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap();
                (ms, how, child)
            })
            .collect();
        for (ms, how, child) in children {
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "exit after {ms} ms ({how}): {:?}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

#[test]
fn demo_and_other_combinations_compile() {
    let dir = tempfile::tempdir().unwrap();
    compile(
        "cc",
        "-std=c11",
        &root().join("tests/c/api_test.c"),
        &dir.path().join("a"),
        true,
    );
    compile(
        "c++",
        "-std=c++17",
        &root().join("tests/c/api_test.c"),
        &dir.path().join("b"),
        false,
    );
    compile(
        "cc",
        "-std=c11",
        &root().join("examples/demo.c"),
        &dir.path().join("demo"),
        false,
    );
}

#[test]
fn committed_header_matches_a_fresh_generation() {
    let fresh = Path::new(env!("OUT_DIR_HEADER"));
    let fresh = std::fs::read_to_string(fresh).expect("build.rs writes a fresh header");
    let committed = std::fs::read_to_string(root().join("include/convoy.h")).unwrap();
    assert!(
        fresh == committed,
        "include/convoy.h is stale: run `cargo build` and commit the regenerated header"
    );
}

/// One host thread serves 256 concurrent requests through `convoy_engine_poll_any`, with
/// cancels and releases mixed in (exactly-once, greedy outputs equal to each prompt alone).
#[test]
fn one_thread_serves_256_requests_with_poll_any() {
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("host_loop");
    compile(
        "cc",
        "-std=c11",
        &root().join("tests/c/host_loop.c"),
        &exe,
        false,
    );
    run(&exe, false);
}

/// The size-prefixed structs of ABI v1: a host built against an older, smaller header
/// (tests/c/old-header/convoy.h, a frozen copy whose structs lack their last fields) and one
/// claiming larger structs than the library knows both run against this library.
#[test]
fn hosts_built_against_older_and_newer_headers() {
    let dir = tempfile::tempdir().unwrap();
    let src = root().join("tests/c/abi_compat.c");
    let old_exe = dir.path().join("abi_old_host");
    compile_with(
        "cc",
        "-std=c11",
        &src,
        &old_exe,
        &[
            format!("-I{}", root().join("tests/c/old-header").display()),
            "-DOLD_HEADER".into(),
        ],
    );
    run(&old_exe, false);
    let new_exe = dir.path().join("abi_new_host");
    compile("cc", "-std=c11", &src, &new_exe, false);
    run(&new_exe, false);
}

/// Fields are only ever appended: every field of every struct in the frozen older header
/// has the same offset and size in the current header (catches a field inserted, reordered
/// or retyped in the middle of a struct).
#[test]
fn older_header_fields_keep_their_offsets() {
    let old = std::fs::read_to_string(root().join("tests/c/old-header/convoy.h")).unwrap();
    let structs = struct_fields(&old);
    assert!(structs.len() >= 7, "{structs:?}");
    let mut prog = String::from(
        "#include <stdio.h>\n#include <stddef.h>\n#include \"convoy.h\"\nint main(void) {\n",
    );
    for (name, fields) in &structs {
        for f in fields {
            prog += &format!(
                "  printf(\"{name}.{f} %zu %zu\\n\", offsetof({name}, {f}), sizeof((({name} *)0)->{f}));\n"
            );
        }
        prog += &format!("  printf(\"{name} align %zu\\n\", _Alignof({name}));\n");
    }
    prog += "  return 0;\n}\n";
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("offsets.c");
    std::fs::write(&src, prog).unwrap();
    let layout = |include: &Path, exe: &str| {
        let exe = dir.path().join(exe);
        let out = Command::new("cc")
            .args(["-std=c11", "-Wall", "-Werror"])
            .arg(format!("-I{}", include.display()))
            .arg(&src)
            .arg("-o")
            .arg(&exe)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(Command::new(&exe).output().unwrap().stdout).unwrap()
    };
    let frozen = layout(&root().join("tests/c/old-header"), "old");
    let current = layout(&root().join("include"), "new");
    assert_eq!(
        frozen, current,
        "a field of the older header moved or changed size"
    );
}

/// The `typedef struct { ... } name;` blocks of a cbindgen header: name and field names.
fn struct_fields(header: &str) -> Vec<(String, Vec<String>)> {
    let lines: Vec<&str> = header.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i] == "typedef struct {" {
            let end = (i..lines.len())
                .find(|&j| lines[j].starts_with("} "))
                .unwrap();
            let name = lines[end]
                .trim_start_matches("} ")
                .trim_end_matches(';')
                .to_owned();
            let fields = lines[i + 1..end]
                .iter()
                .filter(|l| l.starts_with("  ") && l.ends_with(';'))
                .map(|l| {
                    l.trim_end_matches(';')
                        .rsplit(|c: char| !(c.is_alphanumeric() || c == '_'))
                        .next()
                        .unwrap()
                        .to_owned()
                })
                .collect();
            out.push((name, fields));
            i = end;
        }
        i += 1;
    }
    out
}

/// Every name the header defines carries the `convoy_` / `CONVOY_` prefix: macros, types,
/// enum constants, struct fields excepted.
#[test]
fn every_name_in_the_header_is_prefixed() {
    let header = std::fs::read_to_string(root().join("include/convoy.h")).unwrap();
    let mut bad = Vec::new();
    let mut in_comment = false;
    let mut in_enum = false;
    for line in header.lines() {
        let t = line.trim();
        if in_comment {
            in_comment = !t.contains("*/");
            continue;
        }
        if t.starts_with("/*") {
            in_comment = !t.contains("*/");
            continue;
        }
        let word = |s: &str| {
            s.split(|c: char| !(c.is_alphanumeric() || c == '_'))
                .find(|w| !w.is_empty())
                .unwrap_or("")
                .to_owned()
        };
        if let Some(rest) = t.strip_prefix("#define ") {
            let name = word(rest);
            if !name.starts_with("CONVOY_") {
                bad.push(format!("macro {name}"));
            }
        } else if let Some(rest) = t.strip_prefix("enum ") {
            in_enum = !t.ends_with(';');
            let name = word(rest);
            if !name.starts_with("convoy_") {
                bad.push(format!("enum {name}"));
            }
        } else if in_enum && t.starts_with('}') {
            in_enum = false;
        } else if in_enum && t.contains(" = ") {
            let name = word(t);
            if !name.starts_with("CONVOY_") {
                bad.push(format!("enum constant {name}"));
            }
        } else if let Some(rest) = t.strip_prefix("} ").filter(|r| !r.trim().starts_with("//")) {
            let name = word(rest);
            if !name.starts_with("convoy_") {
                bad.push(format!("type {name}"));
            }
        } else if t.starts_with("typedef ") && t.ends_with(';') {
            // `typedef ... name;` or a function pointer `typedef void (*name)(...);`
            let name = match t.find("(*") {
                Some(k) => word(&t[k + 2..]),
                None => t
                    .trim_end_matches(';')
                    .rsplit(|c: char| !(c.is_alphanumeric() || c == '_'))
                    .next()
                    .unwrap_or("")
                    .to_owned(),
            };
            if !name.starts_with("convoy_") {
                bad.push(format!("typedef {name}"));
            }
        } else if !line.starts_with(' ') && !t.starts_with('#') && t.contains('(') {
            // A function declaration's first line: `type name(...`.
            let k = t.find('(').unwrap();
            let name = t[..k]
                .rsplit(|c: char| !(c.is_alphanumeric() || c == '_'))
                .next()
                .unwrap_or("");
            if !name.starts_with("convoy_") {
                bad.push(format!("function {name}"));
            }
        }
    }
    assert!(bad.is_empty(), "unprefixed names in convoy.h: {bad:?}");
}
