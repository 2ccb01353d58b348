//! `scripts/setup.sh` must detect the libclang that bindgen actually loads (issue 7, scenario
//! 1): a stock Debian image ships LLVM's C++ library `libclang-cpp.so.N`, which is not the C
//! API bindgen needs, and setup used to take it for libclang and skip installing it.
use std::path::{Path, PathBuf};
use std::process::Command;

fn find_libclang(search: &str) -> (bool, String) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(root.join("scripts/setup.sh"))
        .arg("--find-libclang")
        .env("CONVOY_LIBCLANG_SEARCH", search)
        .output()
        .expect("run scripts/setup.sh");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
    )
}

/// A real shared library to stand in for files of other names: the C library itself.
fn some_shared_library() -> PathBuf {
    for p in [
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/usr/lib/x86_64-linux-gnu/libc.so.6",
        "/lib/aarch64-linux-gnu/libc.so.6",
        "/usr/lib/aarch64-linux-gnu/libc.so.6",
        "/usr/lib/libSystem.B.dylib",
    ] {
        if Path::new(p).exists() {
            return p.into();
        }
    }
    panic!("no libc found to stand in for a library");
}

#[test]
fn a_folder_with_only_libclang_cpp_has_no_libclang() {
    let dir = tempfile::tempdir().unwrap();
    // Named like LLVM's C++ library, and a real shared library without clang's C API.
    std::os::unix::fs::symlink(some_shared_library(), dir.path().join("libclang-cpp.so.14"))
        .unwrap();
    std::os::unix::fs::symlink(some_shared_library(), dir.path().join("libclang-cpp.so")).unwrap();
    let (found, path) = find_libclang(dir.path().to_str().unwrap());
    assert!(!found, "took {path} for libclang");
}

#[test]
fn a_file_named_libclang_without_its_api_does_not_count() {
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(some_shared_library(), dir.path().join("libclang.so.1")).unwrap();
    let (found, path) = find_libclang(dir.path().to_str().unwrap());
    assert!(!found, "took {path} (no clang_createIndex) for libclang");
}

#[test]
fn the_real_libclang_is_found_under_its_versioned_names() {
    // The machine's own libclang (installed by setup); skip where there is none.
    let (found, real) = find_libclang("/usr/lib/llvm-*/lib:/usr/lib/x86_64-linux-gnu");
    if !found {
        eprintln!("no libclang on this machine: skipped");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Debian's runtime package names it libclang-14.so.14 / libclang.so.1, without the
    // unversioned link that only the -dev package adds.
    std::os::unix::fs::symlink(&real, dir.path().join("libclang-14.so.14")).unwrap();
    std::os::unix::fs::symlink(some_shared_library(), dir.path().join("libclang-cpp.so.14"))
        .unwrap();
    let (found, path) = find_libclang(dir.path().to_str().unwrap());
    assert!(found);
    assert!(path.ends_with("libclang-14.so.14"), "{path}");
}
