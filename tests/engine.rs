//! The continuous-batching engine on the real model: parity with single-sequence decoding,
//! joining and leaving mid-decode, cancellation, stopping, limits, shutdown.
mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::*;
use convoy::model::{self, LoadOptions};
use convoy::runner::generate_greedy;
use convoy::{
    BatchMode, Engine, EngineConfig, Error, Event, FinishReason, Prompt, Request, SamplingParams,
    StopConditions,
};

const GEN: usize = 12;

/// Single-sequence greedy outputs of QUESTIONS (computed once, on this thread's MLX).
fn reference() -> &'static Vec<(Vec<u32>, Vec<u32>)> {
    static REF: OnceLock<Vec<(Vec<u32>, Vec<u32>)>> = OnceLock::new();
    REF.get_or_init(|| {
        std::thread::spawn(|| {
            let lm = model::load(model_path(), LoadOptions::default()).unwrap();
            QUESTIONS
                .iter()
                .map(|q| {
                    let ids = lm.tokenizer.encode_chat(&chat(q)).unwrap();
                    let out = generate_greedy(&lm, &ids, GEN).unwrap();
                    (ids, out)
                })
                .collect()
        })
        .join()
        .unwrap()
    })
}

fn engine(mode: BatchMode, batch: usize) -> Engine {
    Engine::new(
        model_path(),
        EngineConfig::default().mode(mode).max_batch_size(batch),
    )
    .unwrap()
}

fn request(ids: &[u32], max_tokens: usize) -> Request {
    Request::new(Prompt::Tokens(ids.to_vec())).max_tokens(max_tokens)
}

/// Polls until the terminal event; returns tokens, text and reason. Asserts exactly one
/// terminal event (the id is unknown afterwards).
fn drain(e: &Engine, id: u64) -> (Vec<u32>, String, FinishReason) {
    let (mut toks, mut text) = (Vec::new(), String::new());
    loop {
        match e
            .poll(id, Duration::from_secs(120))
            .unwrap()
            .expect("no event within 120 s")
        {
            Event::Token { token, text: t, .. } => {
                toks.push(token);
                text.push_str(&t);
            }
            Event::Finished {
                reason, text: t, ..
            } => {
                text.push_str(&t);
                assert!(matches!(
                    e.poll(id, Duration::ZERO),
                    Err(Error::UnknownRequest(_))
                ));
                return (toks, text, reason);
            }
        }
    }
}

#[test]
fn known_answer_through_the_engine() {
    let e = engine(BatchMode::Continuous, 4);
    let c = e
        .generate(Request::new(Prompt::Chat(chat(QUESTIONS[0]))).max_tokens(20))
        .unwrap();
    assert_eq!(c.tokens, PARIS_ANSWER);
    assert_eq!(c.text, "The capital of France is Paris.");
    assert_eq!(c.reason, Some(FinishReason::Stop));
    assert_eq!(c.stats.prompt_tokens, 37);
    assert_eq!(c.stats.generated_tokens, 8);
    assert!(
        c.stats.time_to_first_token > 0.0 && c.stats.total_latency >= c.stats.time_to_first_token
    );
}

#[test]
fn static_and_continuous_match_single_sequence() {
    let reference = reference();
    for mode in [BatchMode::Static, BatchMode::Continuous] {
        let e = engine(mode, 3);
        let mut ids = Vec::new();
        for (k, (prompt, _)) in reference.iter().enumerate() {
            ids.push(e.submit(request(prompt, GEN)).unwrap());
            // Stagger arrivals so requests join a batch that is already decoding.
            if k % 3 == 1 {
                std::thread::sleep(Duration::from_millis(300));
            }
        }
        for (k, id) in ids.into_iter().enumerate() {
            let (toks, _, _) = drain(&e, id);
            assert_eq!(
                toks, reference[k].1,
                "{mode:?}: prompt {k} differs from its single-sequence output"
            );
        }
    }
}

#[test]
fn second_round_after_the_batch_drained() {
    // Regression: the second round of requests after the cache emptied (shape errors elsewhere).
    let reference = reference();
    let e = engine(BatchMode::Continuous, 4);
    for round in 0..2 {
        let ids: Vec<u64> = (0..3)
            .map(|k| e.submit(request(&reference[k + round].0, 4)).unwrap())
            .collect();
        for (k, id) in ids.into_iter().enumerate() {
            assert_eq!(
                drain(&e, id).0,
                reference[k + round].1[..4],
                "round {round}"
            );
        }
        assert_eq!(e.stats().running, 0);
    }
    // Idle retirement: with nothing to do the thread sleeps and no steps happen.
    std::thread::sleep(Duration::from_millis(100));
    let steps = e.stats().steps;
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(e.stats().steps, steps, "idle engine must not step");
    assert_eq!(e.stats().kv_tokens, 0);
}

#[test]
fn seeded_sampling_is_independent_of_batch_companions() {
    let reference = reference();
    let sampling = SamplingParams {
        temperature: 0.9,
        top_k: 40,
        top_p: 0.95,
        min_p: 0.02,
        repetition_penalty: 1.1,
        seed: Some(42),
        ..Default::default()
    };
    let mut req = request(&reference[3].0, 10);
    req.sampling = sampling;
    let e = engine(BatchMode::Continuous, 4);
    let alone = e.generate(req.clone()).unwrap().tokens;
    let others: Vec<u64> = (0..3)
        .map(|k| e.submit(request(&reference[k].0, 10)).unwrap())
        .collect();
    let id = e.submit(req).unwrap();
    let together = drain(&e, id).0;
    for o in others {
        drain(&e, o);
    }
    assert_eq!(alone, together);
}

#[test]
fn stop_strings_and_stop_tokens() {
    let e = engine(BatchMode::Continuous, 4);
    let mut req = Request::new(Prompt::Chat(chat(QUESTIONS[0]))).max_tokens(20);
    req.stop.stop_strings = vec!["France is".into()];
    let c = e.generate(req).unwrap();
    assert_eq!(c.text, "The capital of ");
    assert_eq!(c.reason, Some(FinishReason::Stop));
    let mut req = Request::new(Prompt::Chat(chat(QUESTIONS[0]))).max_tokens(20);
    req.stop.stop_token_ids = vec![4649];
    let c = e.generate(req).unwrap();
    assert_eq!(c.tokens, PARIS_ANSWER[..4]);
    let req = Request {
        stop: StopConditions {
            max_tokens: 3,
            ..Default::default()
        },
        ..Request::new(Prompt::Chat(chat(QUESTIONS[0])))
    };
    let c = e.generate(req).unwrap();
    assert_eq!((c.tokens.len(), c.reason), (3, Some(FinishReason::Length)));
}

#[test]
fn cancel_during_prefill_and_decode() {
    let short = reference()[1].0.clone();
    let e = Engine::new(
        model_path(),
        EngineConfig {
            scheduler: convoy::scheduler::SchedulerConfig {
                prefill_chunk: 8,
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .unwrap();
    let long: String = QUESTIONS.join(" ").repeat(3);
    let decoding = e.submit(request(&short, 200)).unwrap();
    let first = e.poll(decoding, Duration::from_secs(60)).unwrap();
    assert!(
        matches!(first, Some(Event::Token { .. })),
        "the short request is decoding"
    );
    // The long prompt needs ~40 chunks of 8 tokens: cancel it while it is prefilling.
    let in_prefill = e
        .submit(Request::new(Prompt::Text(long)).max_tokens(50))
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    e.cancel(in_prefill).unwrap();
    e.cancel(decoding).unwrap();
    let (toks, _, reason) = drain(&e, in_prefill);
    assert_eq!((toks.len(), reason), (0, FinishReason::Cancelled));
    let (toks, _, reason) = drain(&e, decoding);
    assert_eq!(reason, FinishReason::Cancelled);
    assert!(toks.len() < 199);
    assert!(matches!(e.cancel(decoding), Err(Error::UnknownRequest(_))));
    assert!(matches!(e.cancel(999_999), Err(Error::UnknownRequest(_))));
}

#[test]
fn limits_busy_and_bad_requests() {
    let mut cfg = EngineConfig::default();
    cfg.scheduler.max_waiting = 2;
    cfg.scheduler.max_batch_size = 1;
    cfg.scheduler.max_context = 64;
    let e = Engine::new(model_path(), cfg).unwrap();
    assert_eq!(e.context_length(), 64);
    let too_long = Request::new(Prompt::Tokens(vec![5; 64]));
    assert!(matches!(
        e.submit(too_long),
        Err(Error::PromptTooLong { .. })
    ));
    assert!(matches!(
        e.submit(Request::new(Prompt::Tokens(vec![]))),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        e.submit(Request::new(Prompt::Tokens(vec![49152]))),
        Err(Error::InvalidArgument(_))
    ));
    let mut nan = Request::new(Prompt::Text("hi".into()));
    nan.sampling.temperature = f32::NAN;
    assert!(matches!(e.submit(nan), Err(Error::InvalidArgument(_))));
    // Fill the queue: the engine is single-row, so later ones wait; one must be refused.
    let mut accepted = Vec::new();
    let mut busy = 0;
    for _ in 0..6 {
        match e.submit(Request::new(Prompt::Text("Count to five.".into())).max_tokens(30)) {
            Ok(id) => accepted.push(id),
            Err(Error::Busy(_)) => busy += 1,
            Err(other) => panic!("unexpected {other}"),
        }
    }
    assert!(busy > 0, "a full queue answers busy");
    for id in accepted {
        let (toks, _, reason) = drain(&e, id);
        // The context (64) caps generation.
        assert!(toks.len() <= 30 && reason != FinishReason::Error);
    }
}

#[test]
fn drop_with_requests_in_flight_returns_quickly() {
    let e = engine(BatchMode::Continuous, 4);
    let ids: Vec<u64> = (0..6)
        .map(|k| e.submit(request(&reference()[k].0, 500)).unwrap())
        .collect();
    let _ = e.poll(ids[0], Duration::from_secs(60)).unwrap();
    let start = Instant::now();
    drop(e);
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "drop took {:?}",
        start.elapsed()
    );
}

#[test]
fn request_log_lines() {
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = lines.clone();
    let cfg = EngineConfig {
        log: Some(Arc::new(move |l: &str| {
            sink.lock().unwrap().push(l.to_owned())
        })),
        ..Default::default()
    };
    let e = Engine::new(model_path(), cfg).unwrap();
    let id = e
        .submit(Request::new(Prompt::Chat(chat(QUESTIONS[0]))).max_tokens(20))
        .unwrap();
    drain(&e, id);
    drop(e);
    let lines = lines.lock().unwrap();
    assert_eq!(lines.len(), 1);
    let l = &lines[0];
    for key in [
        "request_id=",
        "prompt_tps=",
        "generation_tps=",
        "total_tps=",
        "total_tokens=45",
        "latency_ms=",
        "finish_reason=stop",
    ] {
        assert!(l.contains(key), "{key} missing in {l}");
    }
}

#[test]
fn many_threads_with_random_cancels() {
    let reference = reference();
    let e = Arc::new(engine(BatchMode::Continuous, 8));
    let results = Arc::new(Mutex::new(HashMap::new()));
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let (e, results) = (e.clone(), results.clone());
            std::thread::spawn(move || {
                for i in 0..8usize {
                    let k = (t * 8 + i) % 8;
                    let id = e.submit(request(&reference[k].0, 6)).unwrap();
                    // A deterministic "random" third of requests is cancelled.
                    let cancel = (t * 31 + i * 17) % 3 == 0;
                    if cancel {
                        let _ = e
                            .poll(id, Duration::from_millis((i as u64 % 4) * 50))
                            .unwrap();
                        let _ = e.cancel(id);
                    }
                    let (toks, _, reason) = drain(&e, id);
                    results
                        .lock()
                        .unwrap()
                        .insert((t, i), (k, cancel, toks, reason));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let results = results.lock().unwrap();
    assert_eq!(results.len(), 64, "every request accounted for");
    for ((t, i), (k, cancel, toks, reason)) in results.iter() {
        match reason {
            FinishReason::Cancelled => assert!(cancel),
            FinishReason::Error => panic!("request {t}/{i} failed"),
            _ => assert_eq!(
                toks[..],
                reference[*k].1[..toks.len().min(6)],
                "request {t}/{i} (prompt {k})"
            ),
        }
        if !cancel {
            assert_eq!(toks.len(), reference[*k].1.len().min(6));
        }
    }
    let s = e.stats();
    eprintln!("concurrency: {s:?}");
    assert_eq!((s.running, s.waiting), (0, 0));
}

#[test]
fn batched_logits_match_single_sequence_logits() {
    use convoy::runner::{generate_greedy_with_logits, MlxRunner};
    use convoy::sampling::Sampler;
    use convoy::scheduler::Runner;
    const TOL: f32 = 2e-3;
    let lm = model::load(model_path(), LoadOptions::default()).unwrap();
    let prompts: Vec<Vec<u32>> = [0usize, 3, 1]
        .iter()
        .map(|&k| lm.tokenizer.encode_chat(&chat(QUESTIONS[k])).unwrap())
        .collect();
    let steps = 6;
    let refs: Vec<(Vec<u32>, Vec<Vec<f32>>)> = prompts
        .iter()
        .map(|p| generate_greedy_with_logits(&lm, p, steps, true).unwrap())
        .collect();
    let mut runner = MlxRunner::new(lm);
    runner.keep_logits(true);
    let mut samplers: Vec<Sampler> = prompts
        .iter()
        .map(|p| Sampler::new(Default::default(), p))
        .collect();
    // rows: (prompt index, step, next input)
    let mut rows: Vec<(usize, usize, u32)> = Vec::new();
    let mut max_diff = 0f32;
    // Checks the last logits and tokens of `rows` (the whole batch after a decode step, the
    // joining rows after a join) against each prompt's reference step, and advances them.
    let mut check = |runner: &MlxRunner, rows: &mut [(usize, usize, u32)], toks: &[u32]| {
        let logits = runner.last_logits().unwrap().as_slice::<f32>().to_vec();
        let vocab = logits.len() / rows.len();
        for (r, row) in rows.iter_mut().enumerate() {
            let (k, step) = (row.0, row.1);
            let reference = &refs[k].1[step];
            let diff = logits[r * vocab..(r + 1) * vocab]
                .iter()
                .zip(reference)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            max_diff = max_diff.max(diff);
            assert!(
                diff < TOL,
                "prompt {k} step {step}: max |logit diff| {diff}"
            );
            assert_eq!(toks[r], refs[k].0[step], "prompt {k} step {step}");
            *row = (k, step + 1, toks[r]);
        }
    };
    let decode =
        |runner: &mut MlxRunner, rows: &[(usize, usize, u32)], samplers: &mut [Sampler]| {
            let inputs: Vec<u32> = rows.iter().map(|r| r.2).collect();
            let mut s: Vec<&mut Sampler> = samplers.iter_mut().take(rows.len()).collect();
            runner.decode(&inputs, &mut s, true).unwrap()
        };
    // The first prompt alone: its first token comes from the prefill's last position.
    runner.start_prefill(&[&prompts[0]], &[None]).unwrap();
    assert!(runner.prefill_step(1 << 20).unwrap());
    // With the merged batch's first step queued at each join (decode-ahead across it).
    let toks = runner.join(&mut [&mut samplers[0]], Some(&[])).unwrap();
    rows.push((0, 0, 0));
    check(&runner, &mut rows[..], &toks);
    let toks = decode(&mut runner, &rows, &mut samplers);
    check(&runner, &mut rows[..], &toks);
    // Two prompts of different lengths prefill as one left-padded group, in chunks, while row
    // 0 keeps decoding; then they join mid-decode.
    runner
        .start_prefill(&[&prompts[1], &prompts[2]], &[None, None])
        .unwrap();
    while !runner.prefill_step(16).unwrap() {
        let toks = decode(&mut runner, &rows, &mut samplers);
        check(&runner, &mut rows[..], &toks);
    }
    let (_, joining) = samplers.split_at_mut(1);
    let mut s: Vec<&mut Sampler> = joining.iter_mut().collect();
    let running = [rows[0].2];
    let toks = runner.join(&mut s, Some(&running)).unwrap();
    rows.push((1, 0, 0));
    rows.push((2, 0, 0));
    check(&runner, &mut rows[1..], &toks);
    while rows.iter().all(|r| r.1 < steps) {
        let toks = decode(&mut runner, &rows, &mut samplers);
        check(&runner, &mut rows[..], &toks);
    }
    eprintln!("max |logit difference| batched vs single: {max_diff:e} (tolerance {TOL:e})");
}

/// Needs the `fault-injection` feature (`make test` turns it on).
#[cfg(feature = "fault-injection")]
#[test]
fn failures_on_the_engine_thread_end_requests_and_never_hang() {
    use convoy::engine::Fault;
    let e = engine(BatchMode::Continuous, 4);
    // EOS ignored: both are still running when the fault arrives (a short answer could end
    // first on a busy machine).
    let long = |k: usize| {
        let mut r = request(&reference()[k].0, 200);
        r.stop.ignore_eos = true;
        r
    };
    let a = e.submit(long(0)).unwrap();
    let b = e.submit(long(1)).unwrap();
    for id in [a, b] {
        assert!(matches!(
            e.poll(id, Duration::from_secs(60)).unwrap(),
            Some(Event::Token { .. })
        ));
    }
    // An MLX error in a step: the running requests fail, the engine keeps serving.
    e.inject_fault(Fault::StepError).unwrap();
    assert_eq!(drain(&e, a).2, FinishReason::Error);
    assert_eq!(drain(&e, b).2, FinishReason::Error);
    let c = e
        .generate(Request::new(Prompt::Chat(chat(QUESTIONS[0]))).max_tokens(20))
        .unwrap();
    assert_eq!(c.tokens, PARIS_ANSWER);
    // A panic on the engine thread: in-flight requests end with an error, and every later
    // call says the engine failed.
    let d = e.submit(request(&reference()[2].0, 200)).unwrap();
    let unpolled = e.submit(request(&reference()[3].0, 200)).unwrap();
    let released = e.submit(request(&reference()[4].0, 200)).unwrap();
    e.inject_fault(Fault::Panic).unwrap();
    let (_, _, reason) = drain(&e, d);
    assert_eq!(reason, FinishReason::Error);
    assert!(
        matches!(e.submit(request(&reference()[0].0, 4)), Err(Error::EngineFailed(m)) if m.contains("panic"))
    );
    // After the failure: cancel says so (not "shut down"); queued events are still delivered,
    // exactly once; release still frees a request.
    assert!(matches!(e.cancel(unpolled), Err(Error::EngineFailed(_))));
    assert_eq!(drain(&e, unpolled).2, FinishReason::Error);
    e.release(released).unwrap();
    assert!(matches!(
        e.poll(released, Duration::ZERO),
        Err(Error::UnknownRequest(_))
    ));
    assert_eq!(e.requests_held(), 0);
}

/// A batch submitted as one reaches the scheduler together: in static mode it runs as one
/// batch (as many steps as a single request of the same shape), with the same answers as
/// one at a time. A batch with one bad request queues nothing.
#[test]
fn submit_batch_runs_as_one_group_and_is_all_or_nothing() {
    let refs = reference();
    let len = refs.iter().map(|(p, _)| p.len()).min().unwrap();
    let prompts: Vec<Vec<u32>> = refs
        .iter()
        .take(3)
        .map(|(p, _)| p[..len].to_vec())
        .collect();

    let fixed = |p: &[u32]| {
        let mut r = request(p, 4);
        r.stop.ignore_eos = true;
        r
    };
    let single = engine(BatchMode::Static, 3);
    let id = single.submit(fixed(&prompts[0])).unwrap();
    drain(&single, id);
    let single_steps = single.stats().steps;

    let e = engine(BatchMode::Static, 3);
    let ids = e
        .submit_batch(prompts.iter().map(|p| fixed(p)).collect())
        .unwrap();
    assert_eq!(ids.len(), 3);
    let lm = model::load(model_path(), LoadOptions::default()).unwrap();
    for (i, id) in ids.iter().enumerate() {
        let (toks, _, reason) = drain(&e, *id);
        assert_eq!(reason, FinishReason::Length);
        let expect = generate_greedy(&lm, &prompts[i], 4).unwrap();
        assert_eq!(toks[..expect.len()], expect[..], "row {i}");
    }
    assert_eq!(
        e.stats().steps,
        single_steps,
        "the three requests ran as one static batch"
    );

    assert!(matches!(
        e.submit_batch(vec![]),
        Err(Error::InvalidArgument(_))
    ));
    let bad = vec![
        request(&prompts[0], 4),
        Request::new(Prompt::Tokens(vec![49152])),
    ];
    assert!(matches!(
        e.submit_batch(bad),
        Err(Error::InvalidArgument(_))
    ));
    assert_eq!(e.requests_held(), 0, "nothing of a refused batch is queued");

    // A batch that could never fit is invalid (Busy would invite retries forever); one
    // that does not fit now is Busy, and nothing of it is queued.
    let mut cfg = EngineConfig::default().max_batch_size(1);
    cfg.scheduler.max_waiting = 2;
    cfg.max_requests = 3;
    let small = Engine::new(model_path(), cfg).unwrap();
    let three = (0..3).map(|_| request(&prompts[0], 2)).collect();
    assert!(matches!(
        small.submit_batch(three),
        Err(Error::InvalidArgument(_))
    ));
    let held = small.submit_batch(vec![request(&prompts[0], 2)]).unwrap();
    let two: Vec<Request> = (0..2).map(|_| request(&prompts[0], 2)).collect();
    let _ = drain(&small, held[0]);
    let first = small.submit_batch(two.clone()).unwrap();
    // Two held (not polled yet) + two more > max_requests 3.
    assert!(matches!(small.submit_batch(two), Err(Error::Busy(_))));
    assert_eq!(small.requests_held(), 2);
    for id in first {
        drain(&small, id);
    }
    assert_eq!(small.requests_held(), 0);
    let bad = vec![request(&prompts[0], 2), request(&prompts[0], 0)];
    match small.submit_batch(bad) {
        Err(Error::InvalidArgument(m)) => assert!(m.contains("request 1 of the batch"), "{m}"),
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}
