//! Lets the binary find libmlx and the same OpenBLAS as convoy at run time without
//! LD_LIBRARY_PATH (see convoy's build.rs: it exports both folders as `DEP_CONVOY_*`).
use std::env;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if let Ok(dir) = env::var("DEP_CONVOY_LIB_DIR") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
    // OpenBLAS must be a direct dependency of the binary, so that libmlx's BLAS calls
    // resolve there rather than in the wheel's reference BLAS.
    if let Ok(dir) = env::var("DEP_CONVOY_OPENBLAS_DIR") {
        println!("cargo:rustc-link-arg=-L{dir}");
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        println!("cargo:rustc-link-arg=-Wl,--push-state,--no-as-needed");
        println!("cargo:rustc-link-arg=-lopenblas");
        println!("cargo:rustc-link-arg=-Wl,--pop-state");
    }
}
