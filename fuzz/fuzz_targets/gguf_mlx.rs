//! AFL++ harness: `convoy::fuzzing::gguf_mlx` on each input (see src/fuzzing.rs).
fn main() {
    let verbose = std::env::var_os("CONVOY_FUZZ_VERBOSE").is_some();
    afl::fuzz!(|data: &[u8]| {
        let result = convoy::fuzzing::gguf_mlx(data);
        if verbose {
            eprintln!("gguf_mlx: {result:?}");
        }
    });
}
