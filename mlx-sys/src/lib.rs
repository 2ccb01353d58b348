//! Raw bindings to mlx-c, generated at build time exactly as upstream `mlx-sys` 0.7.0 does,
//! against the official prebuilt MLX library (see `build.rs` for how it is provisioned).
#![allow(non_upper_case_globals)]
#![allow(non_camel_case_types)]
#![allow(non_snake_case)]
#![allow(clippy::all)]
#![allow(rustdoc::all)]

include!(concat!(env!("OUT_DIR"), "/bindings.rs"));
