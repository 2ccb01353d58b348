//! Structured output (issue 13) on the real model: constrained rows batched with each other
//! and with unconstrained rows, joining at different steps, greedy and sampled. Every
//! constrained output parses and validates against its own schema (checked with the
//! `jsonschema` crate, not with llguidance), regex and Lark outputs match, unconstrained rows
//! equal their single-sequence output, and the runner picks exactly the best allowed token.
mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use convoy::constraint::Grammars;
use convoy::model::{self, LoadOptions};
use convoy::runner::{generate_greedy, MlxRunner};
use convoy::sampling::{Sampler, SamplingParams};
use convoy::scheduler::Runner;
use convoy::{
    Constraint, Engine, EngineConfig, Error, Event, FinishReason, Prompt, Request, RequestId,
};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

/// Eight schemas of different shapes, each with the question that asks for it.
fn schemas() -> Vec<(&'static str, Value)> {
    vec![
        (
            "Describe a person as JSON with a name and an age.",
            json!({"type": "object", "properties": {
                "name": {"type": "string", "maxLength": 20},
                "age": {"type": "integer", "minimum": 0, "maximum": 150}},
                "required": ["name", "age"], "additionalProperties": false}),
        ),
        (
            "List a few small numbers as a JSON array.",
            json!({"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99},
                "minItems": 2, "maxItems": 4}),
        ),
        (
            "What color is the sky? Answer in JSON.",
            json!({"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}},
                "required": ["color"], "additionalProperties": false}),
        ),
        (
            "Is water wet? Answer true or false.",
            json!({"type": "boolean"}),
        ),
        (
            "Name a city and its country as JSON.",
            json!({"type": "object", "properties": {
                "city": {"type": "string", "maxLength": 24},
                "country": {"type": "string", "maxLength": 24}},
                "required": ["city", "country"], "additionalProperties": false}),
        ),
        (
            "Give up to three tags for a blog post about cooking, as JSON.",
            json!({"type": "object", "properties": {
                "tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                    "maxItems": 3}},
                "required": ["tags"], "additionalProperties": false}),
        ),
        (
            "Report whether the task succeeded and how many steps it took, as JSON.",
            json!({"type": "object", "properties": {
                "ok": {"type": "boolean"},
                "steps": {"type": "integer", "minimum": 1, "maximum": 9}},
                "required": ["ok", "steps"], "additionalProperties": false}),
        ),
        (
            "Give one or two points on a grid as JSON.",
            json!({"$defs": {"point": {"type": "object", "properties": {
                    "x": {"type": "integer", "minimum": -9, "maximum": 9},
                    "y": {"type": "integer", "minimum": -9, "maximum": 9}},
                    "required": ["x", "y"], "additionalProperties": false}},
                "type": "array", "items": {"$ref": "#/$defs/point"},
                "minItems": 1, "maxItems": 2}),
        ),
    ]
}

/// What one request produced.
#[derive(Default, Debug)]
struct Output {
    tokens: Vec<u32>,
    text: String,
    reason: Option<FinishReason>,
    error: Option<String>,
}

fn record(outputs: &mut HashMap<RequestId, Output>, event: Event) {
    match event {
        Event::Token {
            id, token, text, ..
        } => {
            let o = outputs.entry(id).or_default();
            assert!(o.reason.is_none(), "a token after the end of {id}");
            o.tokens.push(token);
            o.text.push_str(&text);
        }
        Event::Finished {
            id,
            reason,
            text,
            error,
            ..
        } => {
            let o = outputs.entry(id).or_default();
            assert!(o.reason.is_none(), "two endings for {id}");
            o.text.push_str(&text);
            o.reason = Some(reason);
            o.error = error;
        }
    }
}

fn validate(schema: &Value, text: &str) -> Result<(), String> {
    let value: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let validator = jsonschema::validator_for(schema).map_err(|e| e.to_string())?;
    let errors: Vec<String> = validator
        .iter_errors(&value)
        .map(|e| e.to_string())
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// Eight constrained requests (eight schemas, two of them sampled) and four unconstrained
/// ones arrive in a random order, a few events apart, so rows join a running batch at
/// different steps and leave at different steps; a few seeds.
#[test]
fn schemas_hold_under_batching_and_unconstrained_rows_are_unchanged() {
    const PLAIN_TOKENS: usize = 16;
    let lm = model::load(model_path(), LoadOptions::default()).unwrap();
    let plain: Vec<(Vec<u32>, Vec<u32>)> = QUESTIONS[..4]
        .iter()
        .map(|q| {
            let ids = lm.tokenizer.encode_chat(&chat(q)).unwrap();
            let out = generate_greedy(&lm, &ids, PLAIN_TOKENS).unwrap();
            (ids, out)
        })
        .collect();
    drop(lm);
    let e = Engine::new(model_path(), EngineConfig::default().max_batch_size(12)).unwrap();
    let schemas = schemas();
    for seed in 0..3u64 {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        // 0..8: constrained (schema k), 8..12: unconstrained (question k - 8).
        let mut order: Vec<usize> = (0..12).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.next_u32() as usize % (i + 1));
        }
        let mut outputs: HashMap<RequestId, Output> = HashMap::new();
        let mut which: HashMap<RequestId, usize> = HashMap::new();
        for &k in &order {
            let request = if k < 8 {
                let (question, schema) = &schemas[k];
                let mut r = Request::new(Prompt::Chat(chat(question)))
                    .max_tokens(120)
                    .constrained(Constraint::JsonSchema(schema.to_string()));
                if k % 4 == 3 {
                    r.sampling.temperature = 0.9;
                    r.sampling.seed = Some(seed * 10 + k as u64);
                }
                r
            } else {
                Request::new(Prompt::Tokens(plain[k - 8].0.clone())).max_tokens(PLAIN_TOKENS)
            };
            which.insert(e.submit(request).unwrap(), k);
            for _ in 0..rng.next_u32() % 8 {
                if outputs.values().filter(|o| o.reason.is_some()).count() == which.len() {
                    break;
                }
                let ev = e.poll_any(Duration::from_secs(120)).unwrap();
                record(&mut outputs, ev.expect("an event within 120 s"));
            }
        }
        while outputs.values().filter(|o| o.reason.is_some()).count() < which.len() {
            let ev = e
                .poll_any(Duration::from_secs(120))
                .unwrap()
                .expect("an event within 120 s");
            record(&mut outputs, ev);
        }
        for (id, &k) in &which {
            let o = &outputs[id];
            if k < 8 {
                let (_, schema) = &schemas[k];
                assert_eq!(
                    o.reason,
                    Some(FinishReason::Stop),
                    "seed {seed} schema {k}: {o:?}"
                );
                if let Err(why) = validate(schema, &o.text) {
                    panic!("seed {seed} schema {k}: {:?} is invalid: {why}", o.text);
                }
            } else {
                assert_eq!(o.tokens, plain[k - 8].1, "seed {seed} question {}", k - 8);
            }
        }
    }
}

/// A regex and a Lark grammar constrain the whole output; a schema compiles once per request,
/// so the same constraint in two requests keeps separate states.
#[test]
fn regex_and_grammar_outputs_match() {
    let e = Engine::new(model_path(), EngineConfig::default()).unwrap();
    let regex = r"(yes|no), because [a-z ]{1,40}\.";
    let lark = r#"
        start: "The answer is " NUMBER "."
        NUMBER: /[0-9]{1,4}/
    "#;
    let submit = |question: &str, c: Constraint, temperature: f32| {
        let mut r = Request::new(Prompt::Chat(chat(question)))
            .max_tokens(80)
            .constrained(c);
        r.sampling.temperature = temperature;
        r.sampling.seed = Some(3);
        e.submit(r).unwrap()
    };
    let ids = [
        submit("Is the sea salty?", Constraint::Regex(regex.into()), 0.0),
        submit("Is fire cold?", Constraint::Regex(regex.into()), 0.7),
        submit("What is 12 plus 30?", Constraint::Lark(lark.into()), 0.0),
        submit("What is 7 times 6?", Constraint::Lark(lark.into()), 0.7),
    ];
    let mut outputs = HashMap::new();
    while outputs.len() < ids.len() || outputs.values().any(|o: &Output| o.reason.is_none()) {
        let ev = e.poll_any(Duration::from_secs(120)).unwrap().unwrap();
        record(&mut outputs, ev);
    }
    let check = |id: RequestId, pattern: &str| {
        let o = &outputs[&id];
        assert_eq!(o.reason, Some(FinishReason::Stop), "{o:?}");
        let re = regex::Regex::new(&format!("^(?:{pattern})$")).unwrap();
        assert!(
            re.is_match(&o.text),
            "{:?} does not match {pattern}",
            o.text
        );
    };
    check(ids[0], regex);
    check(ids[1], regex);
    check(ids[2], r"The answer is [0-9]{1,4}\.");
    check(ids[3], r"The answer is [0-9]{1,4}\.");
}

/// Bad constraints are refused at submit with the parser's message; nothing is queued, and
/// the engine goes on serving.
#[test]
fn invalid_constraints_are_refused_at_submit() {
    let e = Engine::new(model_path(), EngineConfig::default()).unwrap();
    let refuse = |c: Constraint, needle: &str| {
        let r = Request::new(Prompt::Text("hi".into())).constrained(c);
        match e.submit(r) {
            Err(Error::InvalidArgument(m)) => assert!(m.contains(needle), "{m}"),
            other => panic!("{other:?}"),
        }
    };
    refuse(Constraint::JsonSchema("{not json".into()), "not valid JSON");
    refuse(
        Constraint::JsonSchema(r#"{"type": "objectx"}"#.into()),
        "objectx",
    );
    refuse(Constraint::Regex("[0-9".into()), "unclosed character class");
    refuse(Constraint::Lark("start: foo".into()), "unknown name");
    // In a batch, the message names the request; none of the batch is queued.
    let good = Request::new(Prompt::Text("hi".into())).max_tokens(2);
    let bad = good.clone().constrained(Constraint::Regex("(".into()));
    match e.submit_batch(vec![good.clone(), bad]) {
        Err(Error::InvalidArgument(m)) => assert!(m.contains("request 1"), "{m}"),
        other => panic!("{other:?}"),
    }
    let c = e.generate(good).unwrap();
    assert_eq!(c.tokens.len(), 2);
}

/// On the runner: a constrained greedy row takes the most likely token its constraint allows
/// (checked against the same step's full logits and an independent parser state), beside an
/// unconstrained row, with decode-ahead on; its log-probabilities are the raw ones.
#[test]
fn constrained_rows_take_the_best_allowed_token() {
    let lm = model::load(model_path(), LoadOptions::default()).unwrap();
    let grammars = Grammars::new(lm.tokenizer.clone()).unwrap();
    let schema = schemas()[0].1.to_string();
    let c = Constraint::JsonSchema(schema);
    let prompts: Vec<Vec<u32>> = [QUESTIONS[0], schemas()[0].0]
        .iter()
        .map(|q| lm.tokenizer.encode_chat(&chat(q)).unwrap())
        .collect();
    let eos = lm.tokenizer.eos_ids().to_vec();
    let mut runner = MlxRunner::new(lm);
    runner.keep_logits(true);
    let params = SamplingParams {
        logprobs: Some(2),
        ..Default::default()
    };
    let mut samplers = [
        Sampler::new(params, &prompts[0]),
        Sampler::new(params, &prompts[1]).with_constraint(Some(grammars.compile(&c).unwrap())),
    ];
    // The checker's own state, advanced with the same tokens.
    let mut check = grammars.compile(&c).unwrap();
    let group: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    runner.start_prefill(&group, &[None, None]).unwrap();
    while !runner.prefill_step(32).unwrap() {}
    let mut s: Vec<&mut Sampler> = samplers.iter_mut().collect();
    let mut tokens = runner.join(&mut s, Some(&[])).unwrap();
    for step in 0..60 {
        let logits = runner.last_logits().unwrap().as_slice::<f32>().to_vec();
        let vocab = logits.len() / 2;
        let allowed = check.mask(vocab);
        let row = &logits[vocab..];
        let best = (0..vocab)
            .filter(|&t| allowed[t])
            .max_by(|&a, &b| row[a].total_cmp(&row[b]))
            .unwrap() as u32;
        assert_eq!(tokens[1], best, "step {step}");
        let unmasked = (0..vocab)
            .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
            .unwrap() as u32;
        assert_eq!(
            tokens[0], unmasked,
            "step {step}: the other row is untouched"
        );
        let lps = runner.take_logprobs();
        let lp = lps[1].as_ref().unwrap();
        let max = row.iter().copied().fold(f32::MIN, f32::max) as f64;
        let lse = max
            + row
                .iter()
                .map(|&x| (x as f64 - max).exp())
                .sum::<f64>()
                .ln();
        let want = (row[best as usize] as f64 - lse) as f32;
        assert!((lp.logprob - want).abs() < 1e-4, "{} vs {want}", lp.logprob);
        for (s, &t) in samplers.iter_mut().zip(&tokens) {
            s.accept(t);
        }
        check.consume(tokens[1]);
        if eos.contains(&tokens[1]) {
            break;
        }
        let mut s: Vec<&mut Sampler> = samplers.iter_mut().collect();
        tokens = runner.decode(&tokens, &mut s, true).unwrap();
    }
    assert!(
        eos.contains(&tokens[1]),
        "the object should be complete within 60 tokens"
    );
}
