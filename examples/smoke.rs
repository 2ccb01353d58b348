fn main() {
    let path = std::env::args().nth(1).unwrap();
    let t = std::time::Instant::now();
    let lm = convoy::model::load(&path, Default::default()).unwrap();
    println!(
        "loaded in {:?} quantized={}",
        t.elapsed(),
        lm.model.is_quantized()
    );
    let msgs = [
        convoy::tokenizer::ChatMessage::new(
            "system",
            "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
        ),
        convoy::tokenizer::ChatMessage::new("user", "What is the capital of France?"),
    ];
    let ids = lm.tokenizer.encode_chat(&msgs).unwrap();
    println!("{} {:?}", ids.len(), ids);
    let t = std::time::Instant::now();
    let out = convoy::runner::generate_greedy(&lm, &ids, 20).unwrap();
    println!(
        "{:?} {:?} {:?}",
        out,
        lm.tokenizer.decode(&out),
        t.elapsed()
    );
}
