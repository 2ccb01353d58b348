//! 1. Lets every artifact of this package (the cdylib, tests, examples, benches) find libmlx at
//!    run time without LD_LIBRARY_PATH: an rpath to the directory `mlx-sys` provisioned.
//! 2. Generates `include/convoy.h` from `src/ffi` with cbindgen (see `cbindgen.toml`).
use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    println!("cargo:rerun-if-changed=src/ffi");
    println!("cargo:rerun-if-env-changed=CONVOY_UPDATE_HEADER");

    if let Ok(lib_dir) = env::var("DEP_MLX_LIB_DIR") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
        println!("cargo:lib_dir={lib_dir}");
        // Tests that compile C programs link libmlx from here.
        println!("cargo:rustc-env=CONVOY_MLX_LIB_DIR={lib_dir}");
    }
    let backend = env::var("DEP_MLX_BACKEND").unwrap_or_else(|_| "cpu".into());
    println!("cargo:rustc-env=CONVOY_MLX_BACKEND={backend}");
    build_rows_matmul(&backend);
    // See mlx-sys/build.rs: OpenBLAS must be a direct dependency of every binary so that
    // libmlx's BLAS/LAPACK calls resolve there instead of the wheel's reference BLAS.
    if let Ok(dir) = env::var("DEP_MLX_OPENBLAS_DIR") {
        println!("cargo:rustc-link-arg=-L{dir}");
        // Load the same OpenBLAS build at run time, not whatever the system default is.
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        println!("cargo:rustc-link-arg=-Wl,--push-state,--no-as-needed");
        println!("cargo:rustc-link-arg=-lopenblas");
        println!("cargo:rustc-link-arg=-Wl,--pop-state");
        println!("cargo:openblas_dir={dir}");
        println!("cargo:rustc-env=CONVOY_OPENBLAS_DIR={dir}");
    }

    let crate_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    if crate_dir.join("src/ffi/mod.rs").exists() {
        generate_header(&crate_dir);
    }
}

fn generate_header(crate_dir: &std::path::Path) {
    let mut config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml"))
        .expect("cbindgen.toml is valid");
    // Version macros always equal the crate version (and so convoy_version()).
    let version = env::var("CARGO_PKG_VERSION").unwrap();
    let part = |k: &str| env::var(k).unwrap();
    // The ABI version lives in src/ffi/mod.rs (ABI_VERSION); tests check the two agree.
    let abi = std::fs::read_to_string(crate_dir.join("src/ffi/mod.rs"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("pub const ABI_VERSION: u32 = "))
                .map(|v| v.trim_end_matches(';').trim().to_owned())
        })
        .expect("src/ffi/mod.rs defines ABI_VERSION");
    config.after_includes = Some(format!(
        "\n#define CONVOY_VERSION \"{version}\"\n#define CONVOY_VERSION_MAJOR {}\n#define CONVOY_VERSION_MINOR {}\n#define CONVOY_VERSION_PATCH {}\n\n\
         /** The ABI major version: equals convoy_abi_version() of a compatible library. */\n\
         #define CONVOY_ABI_VERSION {abi}\n\n\
         /** Whether a size-prefixed struct `s` of type `type` (a pointer) holds `field`: use it\n\
         \x20*  for fields of structs convoy owns (convoy_request_stats) or fills (after a call,\n\
         \x20*  `struct_size` is the number of bytes convoy wrote). */\n\
         #define CONVOY_HAS_FIELD(s, type, field) \\\n  \
         ((size_t)(s)->struct_size >= offsetof(type, field) + sizeof(((type *)0)->field))\n",
        part("CARGO_PKG_VERSION_MAJOR"),
        part("CARGO_PKG_VERSION_MINOR"),
        part("CARGO_PKG_VERSION_PATCH")
    ));
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("convoy.h");
    match cbindgen::Builder::new()
        .with_crate(crate_dir)
        .with_config(config)
        .generate()
    {
        Ok(bindings) => {
            bindings.write_to_file(&out);
            println!("cargo:rustc-env=OUT_DIR_HEADER={}", out.display());
            // The committed copy is written only when missing or on request
            // (`make header` sets CONVOY_UPDATE_HEADER=1); tests/c_api.rs fails when it
            // differs from this fresh generation, so a stale header cannot go unnoticed.
            let committed = crate_dir.join("include/convoy.h");
            if !committed.exists() || env::var_os("CONVOY_UPDATE_HEADER").is_some() {
                let fresh = std::fs::read(&out).unwrap_or_default();
                let _ = std::fs::create_dir_all(crate_dir.join("include"));
                let _ = std::fs::write(&committed, fresh);
            }
        }
        Err(e) => println!("cargo:warning=cbindgen could not generate convoy.h: {e}"),
    }
}

/// convoy's few-rows matmul for MLX's CPU backend (`src/model/rows_matmul.cc`, an MLX
/// primitive with an AVX2/FMA kernel chosen at run time), on x86-64 only, with GCC's OpenMP
/// (the kernel then shares the OpenMP team of OpenBLAS's OpenMP build); sets
/// `cfg(convoy_rows_matmul)` for the Rust side.
fn build_rows_matmul(backend: &str) {
    println!("cargo::rustc-check-cfg=cfg(convoy_rows_matmul)");
    println!("cargo:rerun-if-changed=src/model/rows_matmul.cc");
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let Ok(include) = env::var("DEP_MLX_INCLUDE_DIR") else {
        return;
    };
    if backend != "cpu" || arch != "x86_64" {
        return;
    }
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++20")
        .file("src/model/rows_matmul.cc")
        .include(include)
        // Always optimized: the kernel is the point, debug builds and tests included.
        .opt_level(3)
        .warnings(false);
    // Without OpenMP the kernel would run on one core, slower than a multi-threaded
    // OpenBLAS: then it is not built, and MLX's matmul is used.
    if !build.get_compiler().is_like_gnu() {
        println!(
            "cargo:warning=convoy's CPU matmul kernel needs GCC's OpenMP (libgomp); this C++ \
             compiler is not GCC-like, so decode steps use MLX's matmul"
        );
        return;
    }
    build.flag("-fopenmp");
    build.compile("convoy_rows_matmul");
    println!("cargo:rustc-link-lib=dylib=gomp");
    println!("cargo:rustc-cfg=convoy_rows_matmul");
}
