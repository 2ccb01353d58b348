//! The C++17 wrapper `include/convoy.hpp`: compiles `tests/cpp/wrapper_test.cpp` with
//! `c++ -std=c++17 -Wall -Wextra -Werror -pedantic` against the shared library of this test
//! run (as tests/c_api.rs links C programs) and runs it on the real model; also checks that
//! the header compiles as cleanly with clang++ (scripts/setup.sh installs it).
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const WARNINGS: [&str; 5] = ["-std=c++17", "-Wall", "-Wextra", "-Werror", "-pedantic"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn compile(compiler: &str, out: &Path) {
    let lib = common::lib_dir();
    assert!(
        lib.join("libconvoy.so").exists(),
        "{} is missing: `cargo test` builds only the rlib; run `cargo build --lib` first (make test does)",
        lib.join("libconvoy.so").display()
    );
    let mlx = env!("CONVOY_MLX_LIB_DIR");
    let output = Command::new(compiler)
        .args(WARNINGS)
        .args(["-O1", "-g"])
        .arg(format!("-I{}", root().join("include").display()))
        .arg(root().join("tests/cpp/wrapper_test.cpp"))
        .arg("-o")
        .arg(out)
        .arg(format!("-L{}", lib.display()))
        .args(["-lconvoy", "-lpthread"])
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .arg(format!("-Wl,-rpath,{mlx}"))
        .output()
        .unwrap_or_else(|e| panic!("run {compiler}: {e}"));
    assert!(
        output.status.success(),
        "{compiler} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn cpp_wrapper_on_the_real_model() {
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("wrapper_test");
    compile("c++", &exe);

    // Output goes to files (no pipe to fill) and the run is bounded: a hang fails the test.
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = Command::new(&exe)
        .arg(common::model_path())
        .stdout(Stdio::from(std::fs::File::create(&out_path).unwrap()))
        .stderr(Stdio::from(std::fs::File::create(&err_path).unwrap()))
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    eprintln!("{stdout}{stderr}");
    let status = status.unwrap_or_else(|| panic!("wrapper_test ran over 300 s:\n{stdout}{stderr}"));
    assert!(
        status.success() && stdout.contains(" passed, 0 failed"),
        "wrapper_test failed ({status}):\n{stdout}{stderr}"
    );
}

/// The header (and the test program) compile without a warning under clang++ too.
#[test]
fn cpp_wrapper_compiles_with_clang() {
    let ok = Command::new("clang++")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "`clang++` is missing: run scripts/setup.sh (make test does) to install it (apt package clang)"
    );
    let output = Command::new("clang++")
        .args(WARNINGS)
        .arg("-fsyntax-only")
        .arg(format!("-I{}", root().join("include").display()))
        .arg(root().join("tests/cpp/wrapper_test.cpp"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "clang++ failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
