//! The Python bindings (bindings/python) pass their pytest suite on the real model, against
//! the libconvoy.so of this test run's profile: runs scripts/test-python.sh, which
//! pip-installs the package into a cached virtual environment (pytest pinned, from PyPI on
//! the first run) and runs bindings/python/tests with CONVOY_LIBRARY set to that library.
mod common;

use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn python_bindings_pass_their_tests() {
    let name = if cfg!(target_os = "macos") {
        "libconvoy.dylib"
    } else {
        "libconvoy.so"
    };
    let lib = common::lib_dir().join(name);
    assert!(
        lib.exists(),
        "{} is missing: `cargo test` builds only the rlib; run `cargo build --lib` first (make test does)",
        lib.display()
    );
    let out = Command::new("bash")
        .arg(root().join("scripts/test-python.sh"))
        .arg(&lib)
        .env("CONVOY_MODEL", common::model_path())
        .current_dir(root())
        .output()
        .expect("run scripts/test-python.sh");
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "scripts/test-python.sh {} failed ({}):\n{output}",
        lib.display(),
        out.status
    );
    // Shown with --nocapture: the pytest summary.
    eprintln!("{output}");
}
