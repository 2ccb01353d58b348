//! The harness binaries link convoy, whose build script's rpath and OpenBLAS link arguments
//! apply to convoy's own artifacts only: repeat them here (convoy exports the folders through
//! its `links = "convoy"` metadata).
fn main() {
    if let Ok(dir) = std::env::var("DEP_CONVOY_LIB_DIR") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
    if let Ok(dir) = std::env::var("DEP_CONVOY_OPENBLAS_DIR") {
        println!("cargo:rustc-link-arg=-L{dir}");
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        println!("cargo:rustc-link-arg=-Wl,--push-state,--no-as-needed");
        println!("cargo:rustc-link-arg=-lopenblas");
        println!("cargo:rustc-link-arg=-Wl,--pop-state");
    }
}
