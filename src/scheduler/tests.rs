//! The scheduler against a fake runner whose next token is a function of the row's whole
//! history, so any row mix-up during join/leave changes the outputs.
use std::collections::HashMap;

use super::*;

fn next_of(history: &[u32]) -> u32 {
    let sum: u64 = history.iter().map(|&t| t as u64).sum();
    10 + ((sum * 7 + history.len() as u64) % 40) as u32
}

/// The tokens a request would get alone.
fn alone(prompt: &[u32], n: usize) -> Vec<u32> {
    let mut hist = prompt.to_vec();
    let mut out = Vec::new();
    for _ in 0..n {
        let t = next_of(&hist);
        hist.push(t);
        out.push(t);
    }
    out
}

#[derive(Default)]
struct FakeRunner {
    rows: Vec<Vec<u32>>,
    group: Vec<Vec<u32>>,
    group_done: usize,
    group_len: usize,
    max_rows_seen: usize,
    joins_while_running: usize,
    fail_next_decode: bool,
}

impl Runner for FakeRunner {
    fn start_prefill(&mut self, prompts: &[&[u32]]) -> Result<()> {
        assert!(self.group.is_empty(), "one group at a time");
        self.group = prompts.iter().map(|p| p.to_vec()).collect();
        self.group_len = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        self.group_done = 0;
        Ok(())
    }
    fn prefill_step(&mut self, max_columns: usize) -> Result<bool> {
        self.group_done = (self.group_done + max_columns.max(1)).min(self.group_len);
        Ok(self.group_done == self.group_len)
    }
    fn retain_prefill(&mut self, rows: &[usize]) -> Result<()> {
        self.group = rows.iter().map(|&r| self.group[r].clone()).collect();
        Ok(())
    }
    fn join(&mut self) -> Result<()> {
        if !self.rows.is_empty() {
            self.joins_while_running += 1;
        }
        self.rows.append(&mut self.group);
        Ok(())
    }
    fn decode(&mut self, inputs: &[u32], samplers: &mut [&mut Sampler]) -> Result<Vec<u32>> {
        assert_eq!(inputs.len(), self.rows.len());
        assert_eq!(samplers.len(), self.rows.len());
        if std::mem::take(&mut self.fail_next_decode) {
            return Err(Error::Mlx("injected failure".into()));
        }
        self.max_rows_seen = self.max_rows_seen.max(self.rows.len());
        Ok(self
            .rows
            .iter_mut()
            .zip(inputs)
            .map(|(h, &i)| {
                h.push(i);
                next_of(h)
            })
            .collect())
    }
    fn retain(&mut self, rows: &[usize]) -> Result<()> {
        self.rows = rows.iter().map(|&r| self.rows[r].clone()).collect();
        Ok(())
    }
    fn reset(&mut self) {
        self.rows.clear();
        self.group.clear();
    }
    fn kv_tokens(&self) -> usize {
        self.rows.iter().map(Vec::len).sum()
    }
    fn take_eval_time(&mut self) -> Duration {
        Duration::ZERO
    }
}

/// Letters for ids: token t is the character 'a' + t % 26.
struct Letters;
impl TextDecoder for Letters {
    fn decode_ids(&self, ids: &[u32]) -> Result<String> {
        Ok(ids
            .iter()
            .map(|&t| (b'a' + (t % 26) as u8) as char)
            .collect())
    }
}

struct Harness {
    sched: Scheduler,
    runner: FakeRunner,
    tokens: HashMap<RequestId, Vec<u32>>,
    text: HashMap<RequestId, String>,
    finished: HashMap<RequestId, (FinishReason, usize)>,
}

impl Harness {
    fn new(cfg: SchedulerConfig) -> Self {
        Self {
            sched: Scheduler::new(cfg),
            runner: FakeRunner::default(),
            tokens: HashMap::new(),
            text: HashMap::new(),
            finished: HashMap::new(),
        }
    }
    fn submit(&mut self, id: RequestId, prompt: Vec<u32>, stop: StopConditions) -> Result<()> {
        self.sched.submit(
            id,
            prompt,
            SamplingParams::default(),
            stop,
            vec![2],
            Instant::now(),
        )
    }
    fn step(&mut self) {
        let mut events = Vec::new();
        self.sched.step(&mut self.runner, &Letters, &mut events);
        for e in events {
            match e {
                Event::Token { id, token, text } => {
                    assert!(
                        !self.finished.contains_key(&id),
                        "token after the terminal event"
                    );
                    self.tokens.entry(id).or_default().push(token);
                    self.text.entry(id).or_default().push_str(&text);
                }
                Event::Finished {
                    id, reason, text, ..
                } => {
                    self.text.entry(id).or_default().push_str(&text);
                    let n = self.finished.get(&id).map_or(0, |f| f.1);
                    self.finished.insert(id, (reason, n + 1));
                }
            }
        }
    }
    fn run(&mut self) {
        for _ in 0..10_000 {
            if self.sched.is_idle() {
                return;
            }
            self.step();
        }
        panic!("scheduler did not drain");
    }
}

fn limit(n: usize) -> StopConditions {
    StopConditions {
        max_tokens: n,
        ..Default::default()
    }
}

fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| 3 + (seed * 13 + i * 5) % 90)
        .collect()
}

#[test]
fn more_requests_than_slots_each_get_their_own_tokens() {
    let mut h = Harness::new(SchedulerConfig {
        max_batch_size: 3,
        prefill_chunk: 4,
        ..Default::default()
    });
    let mut expected = HashMap::new();
    for id in 1..=10u64 {
        let p = prompt(id as u32, 1 + (id as usize * 7) % 23);
        let n = 1 + (id as usize * 3) % 9;
        expected.insert(id, alone(&p, n));
        h.submit(id, p, limit(n)).unwrap();
        // Requests keep arriving while others decode.
        h.step();
    }
    h.run();
    assert!(h.runner.max_rows_seen <= 3);
    assert!(
        h.runner.joins_while_running > 0,
        "continuous mode joins mid-decode"
    );
    for id in 1..=10u64 {
        assert_eq!(h.tokens[&id], expected[&id], "request {id}");
        assert_eq!(h.finished[&id], (FinishReason::Length, 1));
    }
}

#[test]
fn static_mode_never_joins_a_running_batch() {
    let mut h = Harness::new(SchedulerConfig {
        mode: BatchMode::Static,
        max_batch_size: 4,
        ..Default::default()
    });
    for id in 1..=9u64 {
        h.submit(
            id,
            prompt(id as u32, 5 + id as usize),
            limit(2 + id as usize % 4),
        )
        .unwrap();
    }
    h.run();
    assert_eq!(h.runner.joins_while_running, 0);
    for id in 1..=9u64 {
        assert_eq!(
            h.tokens[&id],
            alone(&prompt(id as u32, 5 + id as usize), 2 + id as usize % 4)
        );
    }
}

#[test]
fn cancel_while_waiting_prefilling_and_running() {
    let mut h = Harness::new(SchedulerConfig {
        max_batch_size: 2,
        prefill_chunk: 2,
        ..Default::default()
    });
    h.submit(1, prompt(1, 3), limit(50)).unwrap();
    h.submit(2, prompt(2, 40), limit(50)).unwrap();
    h.submit(3, prompt(3, 3), limit(50)).unwrap();
    h.submit(4, prompt(4, 3), limit(5)).unwrap();
    for _ in 0..3 {
        h.step();
    }
    // 1 and 2 were admitted as one group; 2's long prompt keeps it prefilling.
    assert!(h.sched.cancel(3), "waiting");
    assert!(h.sched.cancel(2), "prefilling");
    h.step();
    for _ in 0..30 {
        h.step();
    }
    assert!(h.tokens.get(&1).is_some_and(|t| !t.is_empty()));
    assert!(h.sched.cancel(1), "running");
    h.run();
    assert_eq!(h.finished[&1], (FinishReason::Cancelled, 1));
    assert_eq!(h.finished[&2], (FinishReason::Cancelled, 1));
    assert_eq!(h.finished[&3], (FinishReason::Cancelled, 1));
    assert!(!h.tokens.contains_key(&3));
    assert_eq!(h.tokens[&4], alone(&prompt(4, 3), 5), "survivor unaffected");
    assert!(!h.sched.cancel(1), "finished ids are unknown");
}

#[test]
fn stop_string_across_tokens_is_not_emitted() {
    let p = prompt(5, 4);
    let full: String = Letters.decode_ids(&alone(&p, 12)).unwrap();
    let stop = full[5..8].to_owned();
    let mut h = Harness::new(SchedulerConfig::default());
    let cond = StopConditions {
        max_tokens: 12,
        stop_strings: vec![stop.clone()],
        ..Default::default()
    };
    h.submit(1, p, cond).unwrap();
    h.run();
    let first = full.find(&stop).unwrap();
    assert_eq!(h.text[&1], full[..first]);
    assert_eq!(h.finished[&1].0, FinishReason::Stop);
}

#[test]
fn eos_and_stop_tokens_end_with_stop() {
    let p = prompt(6, 4);
    let out = alone(&p, 6);
    let mut h = Harness::new(SchedulerConfig::default());
    let cond = StopConditions {
        max_tokens: 6,
        stop_token_ids: vec![out[2]],
        ..Default::default()
    };
    h.submit(1, p, cond).unwrap();
    h.run();
    let first = out.iter().position(|&t| t == out[2]).unwrap();
    assert_eq!(h.tokens[&1], out[..=first]);
    assert_eq!(h.finished[&1].0, FinishReason::Stop);
}

#[test]
fn limits_are_enforced_at_submit() {
    let mut h = Harness::new(SchedulerConfig {
        max_waiting: 2,
        max_context: 16,
        ..Default::default()
    });
    assert!(matches!(
        h.submit(1, prompt(1, 16), limit(1)),
        Err(Error::PromptTooLong { .. })
    ));
    assert!(matches!(
        h.submit(1, vec![], limit(1)),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        h.submit(1, prompt(1, 2), limit(0)),
        Err(Error::InvalidArgument(_))
    ));
    h.submit(1, prompt(1, 4), limit(100)).unwrap();
    h.submit(2, prompt(2, 4), limit(3)).unwrap();
    assert!(matches!(
        h.submit(3, prompt(3, 4), limit(3)),
        Err(Error::Busy(2))
    ));
    h.run();
    // The context caps generation: 16 - 4 prompt tokens.
    assert_eq!(h.tokens[&1].len(), 12);
    assert_eq!(h.finished[&1].0, FinishReason::Length);
}

#[test]
fn kv_budget_limits_admission() {
    let mut h = Harness::new(SchedulerConfig {
        max_kv_tokens: 20,
        ..Default::default()
    });
    h.submit(1, prompt(1, 5), limit(10)).unwrap();
    h.submit(2, prompt(2, 5), limit(10)).unwrap();
    h.step();
    h.step();
    assert_eq!(
        h.sched.stats().running + h.sched.stats().prefilling,
        1,
        "second waits for budget"
    );
    h.run();
    assert_eq!(h.tokens[&2], alone(&prompt(2, 5), 10));
}

#[test]
fn runner_failure_fails_active_requests_once_and_queue_survives() {
    let mut h = Harness::new(SchedulerConfig {
        max_batch_size: 1,
        ..Default::default()
    });
    h.submit(1, prompt(1, 3), limit(5)).unwrap();
    h.submit(2, prompt(2, 3), limit(5)).unwrap();
    h.step();
    h.runner.fail_next_decode = true;
    h.step();
    assert_eq!(h.finished[&1], (FinishReason::Error, 1));
    h.run();
    assert_eq!(h.tokens[&2], alone(&prompt(2, 3), 5));
    assert_eq!(h.finished[&2], (FinishReason::Length, 1));
}

#[test]
fn one_token_prompts_and_one_token_outputs() {
    let mut h = Harness::new(SchedulerConfig::default());
    h.submit(1, vec![7], limit(1)).unwrap();
    h.submit(2, vec![9], limit(3)).unwrap();
    h.run();
    assert_eq!(h.tokens[&1], alone(&[7], 1));
    assert_eq!(h.tokens[&2], alone(&[9], 3));
}

#[test]
fn split_at_stop_holds_back_possible_prefixes() {
    let stops = vec!["END".to_owned()];
    assert_eq!(split_at_stop("abcE", &stops), (3, false));
    assert_eq!(split_at_stop("abcEN", &stops), (3, false));
    assert_eq!(split_at_stop("abENDx", &stops), (2, true));
    assert_eq!(split_at_stop("abc", &stops), (3, false));
}
