//! Provisions MLX for mlx-rs without building MLX from source and without network access
//! beyond the package registries:
//!
//! 1. MLX itself: `MLX_DIR` if set (an install prefix holding `include/mlx`, `lib/libmlx.*` and
//!    `share/cmake/MLX`, or that `share/cmake/MLX` directory itself), otherwise the official
//!    prebuilt wheel pinned to 0.32.2 (`mlx-cpu` on Linux, `mlx-metal` on macOS, `mlx-cuda-13`
//!    with the `cuda` feature or `CONVOY_MLX_BACKEND=cuda`), installed with pip into a cache
//!    outside the source tree.
//! 2. mlx-c: the sources shipped inside the upstream `mlx-sys` 0.7.0 package, located through
//!    `cargo metadata` (cargo fetches the package into its own registry cache), built with cmake
//!    against the MLX above.
//! 3. Bindings: bindgen over mlx-c's headers with the same settings as upstream, so mlx-rs
//!    compiles unchanged.
//!
//! Dependents read `DEP_MLX_LIB_DIR` (where libmlx lives, for an rpath) and `DEP_MLX_BACKEND`.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const MLX_VERSION: &str = "0.32.2";
const UPSTREAM_MLX_SYS: &str = "0.7.0";

fn main() {
    for var in [
        "MLX_DIR",
        "MLX_C_DIR",
        "CONVOY_CACHE_DIR",
        "CONVOY_MLX_BACKEND",
        "CONVOY_PYTHON",
        "CONVOY_NO_OPENBLAS",
        "XDG_CACHE_HOME",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-changed=shim");
    println!("cargo:rerun-if-changed=build.rs");

    let target_os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let target_arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let apple = target_os == "macos" || target_os == "ios";
    let backend = backend(apple);

    let prefix = mlx_prefix(backend);
    let mlx_c = mlx_c_sources();
    check_tool(
        "cmake",
        &["--version"],
        "cmake >= 3.16 (Debian: apt-get install cmake; macOS: brew install cmake)",
    );

    let shim = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap()).join("shim");
    build_mlx_c(&mlx_c, &prefix, &shim, apple, backend == "cuda");
    generate_bindings(&mlx_c, &shim, apple, &target_arch);

    if !apple {
        cc::Build::new()
            .file(shim.join("mach_time.c"))
            .compile("convoy_mach_time");
    }

    let lib_dir = prefix.join("lib");
    println!("cargo:rustc-link-search=native={}", lib_dir.display());
    if backend == "cpu" {
        link_openblas();
    }
    println!("cargo:rustc-link-lib=dylib=mlx");
    println!(
        "cargo:rustc-link-lib=dylib={}",
        if apple { "c++" } else { "stdc++" }
    );
    println!("cargo:lib_dir={}", lib_dir.display());
    // MLX's C++ headers, for dependents that build C++ against MLX (convoy's CPU kernel).
    println!("cargo:include_dir={}", prefix.join("include").display());
    println!("cargo:backend={backend}");
    println!("cargo:version={MLX_VERSION}");
}

fn fail(message: &str) -> ! {
    eprintln!("\n==================== convoy: cannot provision MLX ====================");
    eprintln!("{message}");
    eprintln!("======================================================================\n");
    std::process::exit(1);
}

fn backend(apple: bool) -> &'static str {
    if apple {
        return "metal";
    }
    let wanted = env::var("CONVOY_MLX_BACKEND").unwrap_or_default();
    if env::var_os("CARGO_FEATURE_CUDA").is_some() || wanted.eq_ignore_ascii_case("cuda") {
        "cuda"
    } else if wanted.is_empty() || wanted.eq_ignore_ascii_case("cpu") {
        "cpu"
    } else {
        fail(&format!(
            "CONVOY_MLX_BACKEND={wanted:?} is not one of: cpu, cuda"
        ))
    }
}

fn wheel_name(backend: &str) -> &'static str {
    match backend {
        "metal" => "mlx-metal",
        "cuda" => "mlx-cuda-13",
        _ => "mlx-cpu",
    }
}

fn cache_dir() -> PathBuf {
    if let Some(dir) = env::var_os("CONVOY_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("convoy");
    }
    match env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".cache").join("convoy"),
        None => {
            fail("Neither CONVOY_CACHE_DIR nor HOME is set: cannot choose where to install MLX.")
        }
    }
}

/// Returns the MLX install prefix (the directory with `include/`, `lib/`, `share/cmake/MLX`).
fn mlx_prefix(backend: &str) -> PathBuf {
    if let Some(dir) = env::var_os("MLX_DIR") {
        let dir = PathBuf::from(dir);
        for candidate in [dir.clone(), dir.join("mlx"), dir.join("../../..")] {
            if candidate.join("share/cmake/MLX/MLXConfig.cmake").is_file() {
                return candidate.canonicalize().unwrap_or(candidate);
            }
        }
        fail(&format!(
            "MLX_DIR={} holds no share/cmake/MLX/MLXConfig.cmake. Point it at an MLX install \
             prefix (or unset it to use the pinned wheel).",
            dir.display()
        ));
    }

    let wheel = wheel_name(backend);
    let root = cache_dir().join(format!("{wheel}-{MLX_VERSION}"));
    let prefix = root.join("mlx");
    // A CUDA install is complete with the CUDA library wheels beside MLX (an install by an
    // earlier convoy had only MLX).
    let complete = |root: &Path| {
        root.join("mlx/share/cmake/MLX/MLXConfig.cmake").is_file()
            && (backend != "cuda" || root.join("nvidia/cudnn/lib").is_dir())
    };
    if complete(&root) {
        return prefix;
    }

    let python = env::var("CONVOY_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    check_tool(
        &python,
        &["-m", "pip", "--version"],
        "python3 with pip, to install the official MLX wheel (Debian: apt-get install \
         python3-pip; or set MLX_DIR to an existing MLX install)",
    );
    println!(
        "cargo:warning=installing {wheel}=={MLX_VERSION} into {}{}",
        root.display(),
        if backend == "cuda" {
            " with the CUDA library wheels it needs (about 2.3 GB; this takes minutes)"
        } else {
            ""
        }
    );
    let staging = root.with_extension(format!("partial-{}", std::process::id()));
    let _ = fs::remove_dir_all(&staging);
    // The CPU and Metal wheels need nothing else. The CUDA wheel's libmlx.so finds the CUDA
    // libraries it links (cuBLAS, cuDNN, cuFFT, NVRTC, NCCL) through an RPATH into the
    // `nvidia/*/lib` folders of the site-packages it was installed into, so those wheels
    // (its declared dependencies, ~2 GB) go into the same folder; without them the link
    // fails unless every one of them is on the system's library path.
    let deps: &[&str] = if backend == "cuda" {
        &["--no-cache-dir"]
    } else {
        &["--no-deps"]
    };
    let status = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(deps)
        .args(["--only-binary", ":all:", "--target"])
        .arg(&staging)
        .arg(format!("{wheel}=={MLX_VERSION}"))
        .status();
    match status {
        Ok(s) if s.success() => {}
        other => {
            let _ = fs::remove_dir_all(&staging);
            fail(&format!(
            "`{python} -m pip install {wheel}=={MLX_VERSION}` failed ({other:?}). Check that PyPI \
             is reachable, or install MLX yourself and set MLX_DIR to its prefix."
            ))
        }
    }
    // Rename into place so an interrupted install never looks complete. Another build may
    // have finished the same install meanwhile: then its copy is kept (it may be linking
    // against it now) and this one is dropped.
    if complete(&root) {
        let _ = fs::remove_dir_all(&staging);
        return prefix;
    }
    let _ = fs::remove_dir_all(&root);
    if let Err(e) = fs::rename(&staging, &root) {
        let _ = fs::remove_dir_all(&staging);
        if complete(&root) {
            return prefix;
        }
        fail(&format!(
            "cannot move {} to {}: {e}",
            staging.display(),
            root.display()
        ));
    }
    if !complete(&root) {
        fail(&format!(
            "the {wheel} wheel installed into {} does not have the expected layout \
             (mlx/share/cmake/MLX/MLXConfig.cmake)",
            root.display()
        ));
    }
    prefix
}

/// Finds `src/mlx-c` inside the upstream mlx-sys package through `cargo metadata` on a
/// throwaway manifest, so no third-party source is committed here.
fn mlx_c_sources() -> PathBuf {
    if let Some(dir) = env::var_os("MLX_C_DIR") {
        return PathBuf::from(dir);
    }
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("mlx-c-locator");
    fs::create_dir_all(&out).expect("create OUT_DIR/mlx-c-locator");
    fs::write(
        out.join("Cargo.toml"),
        format!(
            "[package]\nname = \"convoy-mlx-c-locator\"\nversion = \"0.0.0\"\nedition = \"2021\"\n\
             [lib]\npath = \"lib.rs\"\n[dependencies]\nmlx-sys = {{ version = \"={UPSTREAM_MLX_SYS}\", \
             default-features = false }}\n[workspace]\n"
        ),
    )
    .expect("write locator manifest");
    fs::write(out.join("lib.rs"), "").expect("write locator lib.rs");
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let output = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--manifest-path"])
        .arg(out.join("Cargo.toml"))
        .output();
    let output = match output {
        Ok(o) if o.status.success() => o,
        Ok(o) => fail(&format!(
            "`cargo metadata` could not fetch the upstream mlx-sys {UPSTREAM_MLX_SYS} package \
             (mlx-c sources):\n{}\nCheck that crates.io is reachable, or set MLX_C_DIR to an \
             mlx-c checkout at the matching version.",
            String::from_utf8_lossy(&o.stderr)
        )),
        Err(e) => fail(&format!("cannot run cargo metadata: {e}")),
    };
    let meta: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("cargo metadata prints JSON");
    let manifest = meta["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "mlx-sys" && p["version"] == UPSTREAM_MLX_SYS)
        .and_then(|p| p["manifest_path"].as_str())
        .unwrap_or_else(|| fail("cargo metadata did not list mlx-sys 0.7.0"));
    let dir = Path::new(manifest)
        .parent()
        .unwrap()
        .join("src")
        .join("mlx-c");
    if !dir.join("CMakeLists.txt").is_file() {
        fail(&format!("{} has no CMakeLists.txt", dir.display()));
    }
    dir
}

fn check_tool(program: &str, args: &[&str], what: &str) {
    let ok = Command::new(program)
        .args(args)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        fail(&format!(
            "`{program}` is missing or broken. Install {what}."
        ));
    }
}

fn build_mlx_c(mlx_c: &Path, prefix: &Path, shim: &Path, apple: bool, cuda: bool) {
    let cxx = env::var("CXX").unwrap_or_else(|_| "c++".to_owned());
    check_tool(
        &cxx,
        &["--version"],
        "a C++20 compiler (Debian: apt-get install g++; macOS: xcode-select --install)",
    );
    let mut config = cmake::Config::new(mlx_c);
    config
        .profile("Release")
        .define("MLX_C_USE_SYSTEM_MLX", "ON")
        .define("MLX_C_BUILD_EXAMPLES", "OFF")
        .define("BUILD_SHARED_LIBS", "OFF")
        .define("MLX_DIR", prefix.join("share/cmake/MLX"));
    if !apple {
        config.cxxflag(format!(
            "-include {}",
            shim.join("linux_compat.h").display()
        ));
    }
    if cuda {
        cuda_find_modules(&mut config, prefix);
    }
    let dst = config.build();
    for lib in ["lib", "lib64"] {
        println!("cargo:rustc-link-search=native={}", dst.join(lib).display());
    }
    println!("cargo:rustc-link-lib=static=mlxc");
}

/// The CUDA build's `MLXConfig.cmake` requires CMake to find the CUDA toolkit (CMake before
/// 3.27 finds it only through `nvcc`) and cuDNN, although the `mlx` target it exports links
/// nothing from either: libmlx.so carries its own references to the CUDA libraries, and mlx-c
/// compiles against MLX's headers alone. So that a machine with only the NVIDIA driver builds
/// convoy (as a Python user installs the wheel), mlx-c's configure step gets a stand-in
/// `FindCUDAToolkit` pointing at the CUDA wheels installed beside MLX, and cuDNN is looked for
/// there first.
fn cuda_find_modules(config: &mut cmake::Config, prefix: &Path) {
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("cmake-cuda");
    let site = prefix.join("..");
    let cu13 = site.join("nvidia/cu13");
    // An MLX of the user's own (`MLX_DIR`) without the wheels beside it: CMake's own modules
    // find the toolkit and cuDNN it was built with.
    if !cu13.join("lib").is_dir() {
        return;
    }
    let module = format!(
        "# Written by mlx-sys/build.rs: mlx-c uses nothing from the CUDA toolkit.\n\
         set(CUDAToolkit_FOUND TRUE)\n\
         set(CUDAToolkit_VERSION_MAJOR 13)\n\
         set(CUDAToolkit_INCLUDE_DIRS \"{}\")\n\
         set(CUDAToolkit_LIBRARY_DIR \"{}\")\n\
         if(NOT TARGET CUDA::cuda_driver)\n\
           add_library(CUDA::cuda_driver INTERFACE IMPORTED)\n\
         endif()\n",
        cu13.join("include").display(),
        cu13.join("lib").display()
    );
    if let Err(e) =
        fs::create_dir_all(&out).and_then(|()| fs::write(out.join("FindCUDAToolkit.cmake"), module))
    {
        fail(&format!("cannot write {}: {e}", out.display()));
    }
    config.define("CMAKE_MODULE_PATH", &out);
    let cudnn = site.join("nvidia/cudnn");
    if cudnn.is_dir() {
        config
            .define("CUDNN_INCLUDE_PATH", cudnn.join("include"))
            .define("CUDNN_LIBRARY_PATH", cudnn.join("lib"));
    }
}

fn generate_bindings(mlx_c: &Path, shim: &Path, apple: bool, arch: &str) {
    let header_dir = mlx_c.join("mlx/c");
    let mut headers: Vec<PathBuf> = fs::read_dir(&header_dir)
        .unwrap_or_else(|e| fail(&format!("cannot read {}: {e}", header_dir.display())))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "h"))
        .collect();
    headers.sort();

    let mut builder = bindgen::Builder::default()
        .rust_target("1.73.0".parse().expect("rust target"))
        .clang_arg(format!("-I{}", mlx_c.display()))
        .blocklist_function("malloc")
        .blocklist_function("realloc");
    if !apple && arch != "aarch64" {
        builder = builder
            .clang_arg("-include")
            .clang_arg(shim.join("bindgen_half.h").display().to_string());
    }
    for header in &headers {
        builder = builder.header(header.to_string_lossy());
    }
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || builder.generate()));
    let bindings = match result {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => fail(&format!("bindgen failed on mlx-c headers: {e}")),
        Err(_) => fail(
            "bindgen could not run: libclang was not found. Install it (Debian: apt-get \
             install libclang-dev; macOS: xcode-select --install) or set LIBCLANG_PATH.",
        ),
    };
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("bindings.rs");
    bindings.write_to_file(out).expect("write bindings.rs");
}

/// On the CPU backend MLX's wheel ships the slow reference BLAS. Linking OpenBLAS as a direct
/// dependency of every binary puts it ahead of libmlx's own dependencies in symbol lookup, so
/// `cblas_sgemm` and LAPACK resolve there (about 10x faster float32 prefill on 2 cores).
fn link_openblas() {
    if env::var_os("CONVOY_NO_OPENBLAS").is_some() {
        return;
    }
    let multiarch = format!(
        "{}-linux-gnu",
        env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default()
    );
    // The OpenMP build first: the pthread build's thread pool is not safe when several
    // threads call BLAS at once (several engines in one process), and Debian's 0.3.21 can
    // hang joining its workers at process exit.
    let candidates = [
        format!("/usr/lib/{multiarch}/openblas-openmp"),
        format!("/usr/lib/{multiarch}/openblas-pthread"),
        format!("/usr/lib/{multiarch}"),
        "/usr/lib64".to_owned(),
        "/usr/lib".to_owned(),
    ];
    match candidates
        .iter()
        .find(|d| Path::new(d).join("libopenblas.so").exists())
    {
        Some(dir) => {
            // `dylib:-as-needed` is unstable, and rustc passes --as-needed, which would drop a
            // library nothing references directly; the top crate's build script links it
            // with --no-as-needed from this metadata (link args do not propagate).
            println!("cargo:openblas_dir={dir}");
        }
        None => println!(
            "cargo:warning=OpenBLAS not found (Debian: apt-get install libopenblas-openmp-dev); \
             float32 matmuls will use MLX's bundled reference BLAS and be much slower"
        ),
    }
}
