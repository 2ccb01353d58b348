//! AFL++ harness: `convoy::fuzzing::gguf` on each input (see src/fuzzing.rs).
fn main() {
    let verbose = std::env::var_os("CONVOY_FUZZ_VERBOSE").is_some();
    afl::fuzz!(|data: &[u8]| {
        let result = convoy::fuzzing::gguf(data);
        if verbose {
            eprintln!("gguf: {result:?}");
        }
    });
}
