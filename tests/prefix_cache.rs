//! The prefix cache on the real model and the real MLX runner: greedy outputs with the cache
//! equal outputs without it (chat turns, a burst sharing a system prompt, a prefix of a cached
//! prompt, a prompt cached in full, seeded sampling), the budget holds, and a saved cache
//! loads into a new engine (and a file for another model, weights or version is refused).
mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use convoy::mlx_rs::Array;
use convoy::{
    ChatMessage, Completion, Engine, EngineConfig, Error, Event, Prompt, Request, SamplingParams,
    StopConditions,
};

fn engine(prefix_cache_bytes: usize) -> Engine {
    let mut cfg = EngineConfig::default();
    cfg.scheduler.prefix_cache_bytes = prefix_cache_bytes;
    Engine::new(model_path(), cfg).unwrap()
}

fn request(prompt: Prompt, max_tokens: usize) -> Request {
    let mut r = Request::new(prompt);
    r.stop = StopConditions {
        max_tokens,
        ..Default::default()
    };
    r
}

/// Waits for request `id` to end; returns what it produced.
fn collect(engine: &Engine, id: u64) -> Completion {
    let mut c = Completion::default();
    loop {
        match engine.poll(id, Duration::from_secs(600)).unwrap() {
            Some(Event::Token { token, text, .. }) => {
                c.tokens.push(token);
                c.text.push_str(&text);
            }
            Some(Event::Finished {
                reason,
                text,
                stats,
                ..
            }) => {
                c.text.push_str(&text);
                c.reason = Some(reason);
                c.stats = stats;
                return c;
            }
            None => panic!("request {id} made no progress in 600 s"),
        }
    }
}

/// Runs `requests` (all submitted together) on both engines; returns the cached engine's
/// completions after checking that its tokens equal the uncached engine's.
fn both(cached: &Engine, plain: &Engine, requests: Vec<Request>, what: &str) -> Vec<Completion> {
    let run = |e: &Engine| -> Vec<Completion> {
        let ids = e.submit_batch(requests.clone()).unwrap();
        ids.iter().map(|&id| collect(e, id)).collect()
    };
    let with = run(cached);
    let without = run(plain);
    for (i, (a, b)) in with.iter().zip(&without).enumerate() {
        assert_eq!(
            a.tokens, b.tokens,
            "{what}, request {i}: with and without the cache"
        );
        assert_eq!(b.stats.cached_tokens, 0);
    }
    with
}

#[test]
fn greedy_outputs_with_the_cache_equal_outputs_without() {
    let cached = engine(convoy::scheduler::DEFAULT_PREFIX_CACHE_BYTES);
    let plain = engine(0);
    let tok = cached.tokenizer();

    // A chat of three turns: each resends the whole conversation.
    let mut conversation = chat(QUESTIONS[3]);
    let mut before = 0;
    for (turn, follow_up) in ["Say it shorter.", "Now in French.", ""]
        .into_iter()
        .enumerate()
    {
        let ids = tok.encode_chat(&conversation).unwrap();
        let c = both(
            &cached,
            &plain,
            vec![request(Prompt::Chat(conversation.clone()), 24)],
            "chat",
        )
        .remove(0);
        if turn > 0 {
            // Everything the previous turn's prompt and answer covered, as the template
            // renders it again (at least the previous prompt).
            assert!(
                c.stats.cached_tokens >= before && c.stats.cached_tokens < ids.len(),
                "turn {turn}: {} of {} prompt tokens cached, previous prompt {before}",
                c.stats.cached_tokens,
                ids.len()
            );
        }
        before = ids.len();
        if follow_up.is_empty() {
            break;
        }
        conversation.push(ChatMessage::new("assistant", &c.text));
        conversation.push(ChatMessage::new("user", follow_up));
    }

    // A burst sharing a long system prompt, handed over together: the first request computes
    // it, the others wait for it and reuse it.
    let system = format!(
        "{SYSTEM}. {}",
        "Answer carefully, citing the rules you follow. ".repeat(20)
    );
    let burst: Vec<Request> = QUESTIONS[..4]
        .iter()
        .map(|q| {
            request(
                Prompt::Chat(vec![
                    ChatMessage::new("system", &system),
                    ChatMessage::new("user", *q),
                ]),
                12,
            )
        })
        .collect();
    let system_len = tok
        .encode_chat(&[ChatMessage::new("system", &system)])
        .unwrap()
        .len();
    let hits_before = cached.stats().prefix_cache_hits;
    let out = both(&cached, &plain, burst, "burst");
    // (A row whose question is shorter than its group's longest recomputes the difference:
    // the group's rows are left-padded to one width.)
    for c in &out[1..] {
        assert!(
            c.stats.cached_tokens + 40 >= system_len,
            "{} cached of a {system_len}-token system prompt",
            c.stats.cached_tokens
        );
    }
    assert!(cached.stats().prefix_cache_hits >= hits_before + 3);

    // A prompt that is a prefix of a cached one, and a prompt cached in full (only its last
    // token is computed, by the first decode step).
    let ids = tok.encode_chat(&conversation).unwrap();
    let prefix = ids[..ids.len() - 7].to_vec();
    let c = both(
        &cached,
        &plain,
        vec![request(Prompt::Tokens(prefix.clone()), 16)],
        "prefix",
    )
    .remove(0);
    assert_eq!(c.stats.cached_tokens, prefix.len() - 1);
    let c = both(
        &cached,
        &plain,
        vec![request(Prompt::Tokens(ids.clone()), 16)],
        "full",
    )
    .remove(0);
    assert_eq!(c.stats.cached_tokens, ids.len() - 1);

    // Seeded sampling reproduces with cached prefixes, and matches the uncached engine.
    let mut sampled = request(Prompt::Chat(chat(QUESTIONS[5])), 20);
    sampled.sampling = SamplingParams {
        temperature: 0.9,
        top_p: 0.95,
        seed: Some(7),
        ..Default::default()
    };
    let first = both(&cached, &plain, vec![sampled.clone()], "seeded").remove(0);
    let again = both(&cached, &plain, vec![sampled], "seeded again").remove(0);
    assert_eq!(first.tokens, again.tokens);
    assert!(again.stats.cached_tokens > 0);

    let s = cached.stats();
    assert!(s.prefix_cache_bytes > 0 && s.prefix_cache_entries > 0);
    assert!(s.prefix_cache_bytes <= convoy::scheduler::DEFAULT_PREFIX_CACHE_BYTES);
    assert_eq!(plain.stats().prefix_cache_hits, 0);
}

#[test]
fn the_cache_stays_within_its_budget_while_requests_come_and_go() {
    // Room for about 300 tokens: entries are evicted all the time.
    let budget = 300 * 46_080;
    let e = engine(budget);
    let plain = engine(0);
    let mut reference: HashMap<usize, Vec<u32>> = HashMap::new();
    for round in 0..3 {
        let requests: Vec<Request> = QUESTIONS
            .iter()
            .map(|q| request(Prompt::Chat(chat(q)), 8))
            .collect();
        let ids = e.submit_batch(requests.clone()).unwrap();
        // Cancel one at a random-ish moment; the rest run to the end.
        std::thread::sleep(Duration::from_millis(150 * round));
        e.cancel(ids[round as usize]).unwrap();
        for (i, &id) in ids.iter().enumerate() {
            let c = collect(&e, id);
            assert!(e.stats().prefix_cache_bytes <= budget);
            if i == round as usize {
                continue;
            }
            let want = reference
                .entry(i)
                .or_insert_with(|| plain.generate(requests[i].clone()).unwrap().tokens);
            assert_eq!(&c.tokens, want, "round {round}, request {i}");
        }
    }
    let s = e.stats();
    assert!(s.prefix_cache_bytes <= budget);
    assert!(s.prefix_cache_evictions > 0, "{s:?}");
    assert!(s.prefix_cache_hits > 0, "{s:?}");
}

#[test]
fn a_saved_cache_warms_a_new_engine_and_foreign_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("warm.safetensors");
    let system = format!(
        "{SYSTEM}. {}",
        "Keep answers short and friendly. ".repeat(12)
    );
    let ask = |q: &str| {
        request(
            Prompt::Chat(vec![
                ChatMessage::new("system", &system),
                ChatMessage::new("user", q),
            ]),
            12,
        )
    };
    let (cold, entries) = {
        let e = engine(convoy::scheduler::DEFAULT_PREFIX_CACHE_BYTES);
        let cold = e.generate(ask(QUESTIONS[0])).unwrap();
        assert_eq!(cold.stats.cached_tokens, 0);
        let n = e.save_prefix_cache(&file).unwrap();
        assert!(n > 0);
        (cold, n)
    };
    // A relaunch: the new engine starts warm.
    let cfg = EngineConfig {
        prefix_cache_file: Some(file.clone()),
        ..Default::default()
    };
    let warm = Engine::new(model_path(), cfg.clone()).unwrap();
    assert_eq!(warm.stats().prefix_cache_entries, entries);
    let again = warm.generate(ask(QUESTIONS[0])).unwrap();
    assert_eq!(again.tokens, cold.tokens);
    assert!(again.stats.cached_tokens > 0);
    let other = warm.generate(ask(QUESTIONS[2])).unwrap();
    assert!(
        other.stats.cached_tokens > 20,
        "the system prompt is reused"
    );
    drop(warm);

    // A missing file starts empty.
    let mut missing = cfg.clone();
    missing.prefix_cache_file = Some(dir.path().join("none.safetensors"));
    assert_eq!(
        Engine::new(model_path(), missing)
            .unwrap()
            .stats()
            .prefix_cache_entries,
        0
    );

    // Foreign files: each refused with a message that says why.
    let refused = |name: &str, meta: &[(&str, &str)], why: &str| {
        let path = dir.path().join(name);
        let metadata: HashMap<String, String> = meta
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let a = Array::from_slice(&[0f32; 4], &[1, 1, 1, 4]);
        Array::save_safetensors([("0.0.k", &a)], &metadata, &path).unwrap();
        let mut c = cfg.clone();
        c.prefix_cache_file = Some(path);
        match Engine::new(model_path(), c) {
            Err(Error::InvalidArgument(m)) => assert!(m.contains(why), "{name}: {m}"),
            Err(e) => panic!("{name}: {e}"),
            Ok(_) => panic!("{name} was accepted"),
        }
    };
    refused("plain.safetensors", &[], "not a convoy prefix cache");
    let base = [("format", "convoy-prefix-cache"), ("version", "1")];
    refused(
        "version.safetensors",
        &[base[0], ("version", "99")],
        "format version 99",
    );
    refused(
        "layout.safetensors",
        &[base[0], base[1], ("layout", "2,1,4")],
        "made for another model",
    );
    refused(
        "weights.safetensors",
        &[
            base[0],
            base[1],
            ("layout", "30,3,64"),
            ("probe", "[1.0, 2.0]"),
        ],
        "made for other weights",
    );
    // A name MLX cannot write or read.
    let mut bad = cfg;
    bad.prefix_cache_file = Some(dir.path().join("cache.bin"));
    assert!(matches!(
        Engine::new(model_path(), bad),
        Err(Error::InvalidArgument(_))
    ));
    // A truncated file.
    let cut = dir.path().join("cut.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let c = EngineConfig {
        prefix_cache_file: Some(cut),
        ..Default::default()
    };
    assert!(matches!(
        Engine::new(model_path(), c),
        Err(Error::InvalidArgument(_))
    ));
}
