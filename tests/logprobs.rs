//! Log-probabilities on request (issue 13) on the real model: the runner's values equal a
//! reference computed on the host from the same step's full logits (within 1e-4), for greedy
//! and sampled rows mixed with rows that did not ask, at join and at every decode step, with
//! and without a step queued ahead; through the engine, every TOKEN event of a request that
//! asked carries them and no other does, and asking changes no token.
mod common;

use common::*;
use convoy::model::{self, LoadOptions};
use convoy::request::TokenLogprobs;
use convoy::runner::MlxRunner;
use convoy::sampling::{Sampler, SamplingParams};
use convoy::scheduler::Runner;
use convoy::{Engine, EngineConfig, Error, Event, Prompt, Request};

const TOL: f32 = 1e-4;

fn params(temperature: f32, logprobs: Option<usize>) -> SamplingParams {
    SamplingParams {
        temperature,
        seed: Some(7),
        logprobs,
        ..Default::default()
    }
}

/// Checks one step: `lps` (from the runner) against log-softmax of `logits` (`[B, vocab]`,
/// the same step's, on the host).
fn check_step(
    logits: &[f32],
    tokens: &[u32],
    asked: &[Option<usize>],
    lps: &[Option<TokenLogprobs>],
) {
    let b = tokens.len();
    if asked.iter().all(Option::is_none) {
        assert!(lps.is_empty(), "no row asked: nothing computed");
        return;
    }
    assert_eq!(lps.len(), b);
    let vocab = logits.len() / b;
    for r in 0..b {
        let row = &logits[r * vocab..(r + 1) * vocab];
        let (Some(n), Some(lp)) = (asked[r], &lps[r]) else {
            assert!(asked[r].is_none() && lps[r].is_none(), "row {r}");
            continue;
        };
        let max = row.iter().copied().fold(f32::MIN, f32::max) as f64;
        let lse = max
            + row
                .iter()
                .map(|&x| (x as f64 - max).exp())
                .sum::<f64>()
                .ln();
        let reference = |t: u32| (row[t as usize] as f64 - lse) as f32;
        let want = reference(tokens[r]);
        assert!(
            (lp.logprob - want).abs() < TOL,
            "row {r}: {} vs {want}",
            lp.logprob
        );
        assert_eq!(lp.top.len(), n, "row {r}");
        let mut sorted: Vec<f32> = (0..vocab as u32).map(reference).collect();
        sorted.sort_by(|a, b| b.total_cmp(a));
        for (j, &(id, v)) in lp.top.iter().enumerate() {
            assert!(
                (v - reference(id)).abs() < TOL,
                "row {r} top {j}: token {id}"
            );
            assert!(
                (v - sorted[j]).abs() < TOL,
                "row {r} top {j}: {v} vs {}",
                sorted[j]
            );
        }
        assert!(
            lp.top.windows(2).all(|w| w[0].1 >= w[1].1),
            "most likely first"
        );
    }
}

fn run(runner: &mut MlxRunner, prompts: &[&[u32]], rows: &[SamplingParams], steps: usize) {
    let asked: Vec<Option<usize>> = rows.iter().map(|p| p.logprobs).collect();
    let mut samplers: Vec<Sampler> = rows
        .iter()
        .zip(prompts)
        .map(|(p, prompt)| Sampler::new(*p, prompt))
        .collect();
    let none: Vec<_> = prompts.iter().map(|_| None).collect();
    runner.start_prefill(prompts, &none).unwrap();
    while !runner.prefill_step(64).unwrap() {}
    let mut s: Vec<&mut Sampler> = samplers.iter_mut().collect();
    let mut tokens = runner.join(&mut s, Some(&[])).unwrap();
    let logits = runner.last_logits().unwrap().as_slice::<f32>().to_vec();
    check_step(&logits, &tokens, &asked, &runner.take_logprobs());
    for _ in 0..steps {
        let mut s: Vec<&mut Sampler> = samplers.iter_mut().collect();
        tokens = runner.decode(&tokens, &mut s, true).unwrap();
        let logits = runner.last_logits().unwrap().as_slice::<f32>().to_vec();
        check_step(&logits, &tokens, &asked, &runner.take_logprobs());
    }
    runner.retain(&[]).unwrap();
}

#[test]
fn runner_logprobs_equal_log_softmax_of_the_full_logits() {
    let lm = model::load(model_path(), LoadOptions::default()).unwrap();
    let prompts: Vec<Vec<u32>> = QUESTIONS[..4]
        .iter()
        .map(|q| lm.tokenizer.encode(q, true).unwrap())
        .collect();
    let p: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let mut runner = MlxRunner::new(lm);
    runner.keep_logits(true);
    // Greedy and sampled rows that ask (5, 20, 0 alternatives) beside one that does not: the
    // sampled row keeps every step on the host (no step queued ahead).
    run(
        &mut runner,
        &p,
        &[
            params(0.0, Some(5)),
            params(0.9, Some(20)),
            params(0.0, None),
            params(0.0, Some(0)),
        ],
        6,
    );
    // All greedy: each step was queued ahead, its logprobs read when it is taken.
    run(
        &mut runner,
        &p[..3],
        &[
            params(0.0, Some(3)),
            params(0.0, None),
            params(0.0, Some(20)),
        ],
        6,
    );
    // Only the chosen token's: no top-k is computed.
    run(
        &mut runner,
        &p[..2],
        &[params(0.0, Some(0)), params(0.8, Some(0))],
        3,
    );
    // Nobody asks: nothing is computed.
    run(
        &mut runner,
        &p[..2],
        &[params(0.0, None), params(0.7, None)],
        3,
    );
}

#[test]
fn engine_events_carry_logprobs_only_where_asked() {
    let e = Engine::new(model_path(), EngineConfig::default()).unwrap();
    let mut bad = Request::new(Prompt::Text("hi".into()));
    bad.sampling.logprobs = Some(21);
    assert!(matches!(e.submit(bad), Err(Error::InvalidArgument(_))));
    // Eight requests at once: greedy with and without logprobs on the same prompts, and
    // sampled ones.
    let asks = [
        Some(2),
        None,
        Some(20),
        None,
        Some(0),
        Some(5),
        None,
        Some(1),
    ];
    let ids: Vec<u64> = asks
        .iter()
        .enumerate()
        .map(|(k, &n)| {
            let mut r = Request::new(Prompt::Text(QUESTIONS[k % 4].into())).max_tokens(12);
            r.sampling.logprobs = n;
            if k >= 6 {
                r.sampling.temperature = 0.8;
                r.sampling.seed = Some(k as u64);
            }
            e.submit(r).unwrap()
        })
        .collect();
    let mut outputs = Vec::new();
    for (k, id) in ids.into_iter().enumerate() {
        let mut tokens = Vec::new();
        loop {
            match e.poll(id, std::time::Duration::from_secs(120)).unwrap() {
                Some(Event::Token {
                    token, logprobs, ..
                }) => {
                    tokens.push(token);
                    match (asks[k], logprobs) {
                        (None, None) => {}
                        (Some(n), Some(lp)) => {
                            assert_eq!(lp.top.len(), n);
                            assert!(lp.logprob <= 0.0 && lp.logprob.is_finite());
                            if k < 6 && n > 0 {
                                // Greedy: the chosen token is the most likely.
                                assert!((lp.top[0].1 - lp.logprob).abs() < TOL);
                            }
                        }
                        (n, lp) => panic!("request {k} asked {n:?}, got {lp:?}"),
                    }
                }
                Some(Event::Finished { .. }) => break,
                None => panic!("no event"),
            }
        }
        outputs.push(tokens);
    }
    // Greedy rows on the same prompt: asking changes no token.
    assert_eq!(outputs[0], outputs[4]);
    assert_eq!(outputs[1], outputs[5]);
}

/// Rows leave while a step is queued ahead (its logits are cut to the rows that stay) and a
/// group joins a running batch: every step's log-probabilities still belong to their rows.
#[test]
fn logprobs_follow_rows_through_leaves_and_joins() {
    let lm = model::load(model_path(), LoadOptions::default()).unwrap();
    let prompts: Vec<Vec<u32>> = QUESTIONS[..4]
        .iter()
        .map(|q| lm.tokenizer.encode(q, true).unwrap())
        .collect();
    let mut runner = MlxRunner::new(lm);
    runner.keep_logits(true);
    let mut asked = vec![Some(4), None, Some(2)];
    let mut samplers: Vec<Sampler> = asked
        .iter()
        .zip(&prompts)
        .map(|(&n, p)| Sampler::new(params(0.0, n), p))
        .collect();
    let group: Vec<&[u32]> = prompts[..3].iter().map(Vec::as_slice).collect();
    runner.start_prefill(&group, &[None, None, None]).unwrap();
    while !runner.prefill_step(64).unwrap() {}
    let mut s: Vec<&mut Sampler> = samplers.iter_mut().collect();
    let mut tokens = runner.join(&mut s, None).unwrap();
    let step = |runner: &mut MlxRunner, tokens: &[u32], asked: &[Option<usize>]| {
        let logits = runner.last_logits().unwrap().as_slice::<f32>().to_vec();
        check_step(&logits, tokens, asked, &runner.take_logprobs());
    };
    step(&mut runner, &tokens, &asked);
    let decode = |runner: &mut MlxRunner, tokens: &mut Vec<u32>, samplers: &mut [Sampler]| {
        let mut s: Vec<&mut Sampler> = samplers.iter_mut().collect();
        *tokens = runner.decode(tokens, &mut s, true).unwrap();
    };
    for _ in 0..2 {
        decode(&mut runner, &mut tokens, &mut samplers);
        step(&mut runner, &tokens, &asked);
    }
    // The middle row leaves with a step queued ahead for all three.
    runner.retain(&[0, 2]).unwrap();
    samplers.remove(1);
    asked.remove(1);
    tokens.remove(1);
    for _ in 0..2 {
        decode(&mut runner, &mut tokens, &mut samplers);
        step(&mut runner, &tokens, &asked);
    }
    // A group joins the running batch: the join reports its own rows only.
    runner.start_prefill(&[&prompts[3]], &[None]).unwrap();
    while !runner.prefill_step(16).unwrap() {
        decode(&mut runner, &mut tokens, &mut samplers);
        step(&mut runner, &tokens, &asked);
    }
    let mut joining = Sampler::new(params(0.0, Some(6)), &prompts[3]);
    // The merged batch's first step is queued at the join.
    let first = runner.join(&mut [&mut joining], Some(&tokens)).unwrap();
    step(&mut runner, &first, &[Some(6)]);
    samplers.push(joining);
    asked.push(Some(6));
    tokens.extend(first);
    for _ in 0..3 {
        decode(&mut runner, &mut tokens, &mut samplers);
        step(&mut runner, &tokens, &asked);
    }
}
