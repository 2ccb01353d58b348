//! convoy-server on the real model, driven by clients nobody here wrote: curl (many at once)
//! and the official `openai` Python package (scripts/test-server.sh).
#[path = "../../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use convoy::{Engine, EngineConfig, Prompt, Request};
use serde_json::{json, Value};

/// A convoy-server process on a free port; killed when dropped.
struct Server {
    child: Child,
    url: String,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Server {
    fn start(extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_convoy-server"))
            .arg("--model")
            .arg(common::model_path())
            .args(["--port", "0"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start convoy-server");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let lines = stderr.clone();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(180))
            .unwrap_or_else(|_| {
                panic!("convoy-server did not start: {:?}", stderr.lock().unwrap())
            });
        let url = line
            .split("listening on ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .unwrap_or_else(|| panic!("unexpected first line: {line}"))
            .to_owned();
        Self { child, url, stderr }
    }

    /// curl with `args` on `path`: (HTTP status, headers, body).
    fn curl(&self, path: &str, args: &[&str]) -> (u16, String, String) {
        let out = Command::new("curl")
            .args(["-sS", "-D", "/dev/stderr", "-w", "\n%{http_code}"])
            .args(args)
            .arg(format!("{}{path}", self.url))
            .output()
            .expect("run curl");
        let stdout = String::from_utf8(out.stdout).unwrap();
        let (body, code) = stdout.rsplit_once('\n').unwrap();
        (
            code.trim().parse().unwrap_or(0),
            String::from_utf8_lossy(&out.stderr).into_owned(),
            body.to_owned(),
        )
    }

    fn post(&self, path: &str, body: &Value) -> (u16, String, Value) {
        let (code, headers, text) = self.curl(
            path,
            &[
                "-H",
                "Content-Type: application/json",
                "-d",
                &body.to_string(),
            ],
        );
        let v = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {text}"));
        (code, headers, v)
    }

    /// A streaming request through curl, as a child process writing SSE to its stdout.
    fn stream(&self, path: &str, body: &Value) -> Child {
        // A stream that never ends fails the test (curl exits non-zero) instead of hanging it.
        Command::new("curl")
            .args([
                "-sSN",
                "--max-time",
                "900",
                "-H",
                "Content-Type: application/json",
                "-d",
                &body.to_string(),
            ])
            .arg(format!("{}{path}", self.url))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("run curl")
    }

    /// The metric samples of /metrics, by name with labels (`name{label="v"}`).
    fn metrics(&self) -> HashMap<String, f64> {
        let (code, _, text) = self.curl("/metrics", &[]);
        assert_eq!(code, 200);
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                Some((name.to_owned(), value.parse().ok()?))
            })
            .collect()
    }

    fn metric(&self, name: &str) -> f64 {
        self.metrics().get(name).copied().unwrap_or(0.0)
    }

    /// Waits until `check` holds on /metrics.
    fn wait_metrics(&self, what: &str, check: impl Fn(&HashMap<String, f64>) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let m = self.metrics();
            if check(&m) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {m:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits (up to 30 s) until `n` request log lines have been read from stderr: the engine
    /// writes a request's line just after its last event, and a reader thread collects them.
    fn wait_log_lines(&self, n: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let lines = self.log_lines();
            if lines.len() >= n || Instant::now() > deadline {
                return lines;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_lines(&self) -> Vec<String> {
        self.stderr
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with("request_id="))
            .cloned()
            .collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An SSE answer, parsed: the JSON chunks, how many `[DONE]` there were and whether the
/// last data line was `[DONE]`.
struct Sse {
    chunks: Vec<Value>,
    done: usize,
    done_last: bool,
}

fn parse_sse(text: &str) -> Sse {
    let data: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    Sse {
        chunks: data
            .iter()
            .filter(|d| **d != "[DONE]")
            .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("bad chunk {d}: {e}")))
            .collect(),
        done: data.iter().filter(|d| **d == "[DONE]").count(),
        done_last: data.last() == Some(&"[DONE]"),
    }
}

/// The text of a chat or completion stream and its finish reasons.
fn stream_text(sse: &Sse) -> (String, Vec<String>) {
    let mut text = String::new();
    let mut reasons = Vec::new();
    for c in &sse.chunks {
        assert!(c.get("error").is_none(), "error chunk: {c}");
        for choice in c["choices"].as_array().unwrap() {
            if let Some(t) = choice["delta"]["content"].as_str() {
                text.push_str(t);
            }
            if let Some(t) = choice["text"].as_str() {
                text.push_str(t);
            }
            if let Some(r) = choice["finish_reason"].as_str() {
                reasons.push(r.to_owned());
            }
        }
    }
    (text, reasons)
}

/// What each of `common::QUESTIONS` gives alone (greedy, `max_tokens`), from the library in
/// this process.
fn answers_alone(max_tokens: usize) -> Vec<String> {
    let engine = Engine::new(common::model_path(), EngineConfig::default()).unwrap();
    common::QUESTIONS
        .iter()
        .map(|q| {
            engine
                .generate(Request::new(Prompt::Chat(common::chat(q))).max_tokens(max_tokens))
                .unwrap()
                .text
        })
        .collect()
}

fn chat_body(question: &str, max_tokens: usize, stream: bool) -> Value {
    json!({
        "model": "whatever",
        "messages": [
            {"role": "system", "content": common::SYSTEM},
            {"role": "user", "content": question},
        ],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    })
}

#[test]
fn endpoints_answers_and_errors_through_curl() {
    let server = Server::start(&["--max-context", "512"]);

    let (code, _, text) = server.curl("/health", &["-X", "POST"]);
    assert_eq!(code, 405, "POST /health: {text}");
    let (code, _, body) = server.curl("/health", &[]);
    assert_eq!(code, 200, "{body}");
    let (code, _, body) = server.curl("/v1/models", &[]);
    assert_eq!(code, 200);
    let models: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        models["data"][0]["id"], "SmolLM2-135M-Instruct.Q4_1",
        "{models}"
    );

    // A whole chat answer equals the engine's own, token for token (same greedy request).
    let engine = Engine::new(common::model_path(), EngineConfig::default()).unwrap();
    let question = common::QUESTIONS[0];
    let alone = engine
        .generate(Request::new(Prompt::Chat(common::chat(question))).max_tokens(16))
        .unwrap();
    let (code, _, v) = server.post("/v1/chat/completions", &chat_body(question, 16, false));
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        alone.text.as_str(),
        "{v}"
    );
    assert_eq!(
        v["choices"][0]["finish_reason"],
        alone.reason.unwrap().as_str()
    );
    let usage = &v["usage"];
    assert_eq!(usage["completion_tokens"], alone.tokens.len());
    assert_eq!(usage["prompt_tokens"], alone.stats.prompt_tokens);
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );
    // The same chat again: its prompt comes from the prefix cache.
    let (_, _, again) = server.post("/v1/chat/completions", &chat_body(question, 16, false));
    assert_eq!(
        again["choices"][0]["message"]["content"],
        alone.text.as_str()
    );
    assert!(
        again["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            > 0,
        "{again}"
    );

    // Text completion, streamed, with usage; a stop string ends it and is not emitted.
    let prompt = "The capital of France is";
    let whole = engine
        .generate(Request::new(Prompt::Text(prompt.into())).max_tokens(12))
        .unwrap();
    let child = server.stream(
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": 12, "stream": true, "stream_options": {"include_usage": true}}),
    );
    let out = child.wait_with_output().unwrap();
    let sse = parse_sse(&String::from_utf8(out.stdout).unwrap());
    assert_eq!((sse.done, sse.done_last), (1, true));
    let (text, reasons) = stream_text(&sse);
    assert_eq!(text, whole.text);
    assert_eq!(reasons, vec![whole.reason.unwrap().as_str().to_string()]);
    let usage = &sse.chunks.last().unwrap()["usage"];
    assert_eq!(usage["completion_tokens"], whole.tokens.len(), "{usage}");
    assert!(sse.chunks.iter().all(|c| c["object"] == "text_completion"));
    let stop = whole.text.split_whitespace().next().unwrap().to_owned();
    let (code, _, v) = server.post(
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": 12, "stop": [stop.clone()]}),
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    assert!(
        !v["choices"][0]["text"].as_str().unwrap().contains(&stop),
        "{v}"
    );

    // Token-id prompts work too.
    let ids = engine.tokenize(prompt, true).unwrap();
    let (code, _, v) = server.post("/v1/completions", &json!({"prompt": ids, "max_tokens": 12}));
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["choices"][0]["text"], whole.text.as_str());
    drop(engine);

    // Bad input: 400 with an OpenAI error body, naming the field where there is one.
    let bad = |body: &str, param: Option<&str>, code: Option<&str>| {
        let (status, _, text) = server.curl(
            "/v1/chat/completions",
            &["-H", "Content-Type: application/json", "-d", body],
        );
        assert_eq!(status, 400, "{body}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error", "{text}");
        assert!(!v["error"]["message"].as_str().unwrap().is_empty());
        assert_eq!(v["error"]["param"].as_str(), param, "{body}: {text}");
        assert_eq!(v["error"]["code"].as_str(), code, "{body}: {text}");
    };
    bad(
        r#"{"messages": [{"role": "user", "content": "hi"}"#,
        None,
        None,
    );
    bad(r#"not json"#, None, None);
    bad(
        r#"{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}"#,
        Some("max_tokens"),
        None,
    );
    bad(
        r#"{"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}"#,
        Some("stream"),
        None,
    );
    bad(r#"{"messages": "hi"}"#, Some("messages"), None);
    bad(
        r#"{"messages": [{"role": "user", "content": "hi"}], "n": 3}"#,
        Some("n"),
        None,
    );
    bad(
        r#"{"messages": [{"role": "user", "content": "hi"}], "temperature": -1}"#,
        None,
        None,
    );
    bad(r#"{"max_tokens": 5}"#, Some("messages"), None);
    let long = "word ".repeat(2000);
    bad(
        &json!({"messages": [{"role": "user", "content": long}]}).to_string(),
        None,
        Some("context_length_exceeded"),
    );
    let (status, _, text) = server.curl("/v1/nothing", &[]);
    assert_eq!(status, 404, "{text}");
    assert!(server.metric("convoy_http_errors_total{status=\"400\"}") >= 9.0);

    // Structured output: response_format's schema holds; an invalid schema is a 400 with
    // the parser's message (and is never queued, so it logs no line).
    let schema = json!({"type": "object", "properties": {"answer": {"type": "string",
        "maxLength": 30}}, "required": ["answer"], "additionalProperties": false});
    let mut body = chat_body(question, 60, false);
    body["response_format"] =
        json!({"type": "json_schema", "json_schema": {"name": "a", "schema": schema}});
    let (code, _, v) = server.post("/v1/chat/completions", &body);
    assert_eq!(code, 200, "{v}");
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    let answer: Value = serde_json::from_str(content).unwrap();
    assert!(answer["answer"].is_string(), "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    body["response_format"] =
        json!({"type": "json_schema", "json_schema": {"schema": {"type": "objectx"}}});
    let (code, _, v) = server.post("/v1/chat/completions", &body);
    assert_eq!(code, 400, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("objectx"),
        "{v}"
    );

    // One log line per request, in the engine's format.
    let lines = server.wait_log_lines(6);
    assert_eq!(lines.len(), 6, "{lines:?}");
    for l in &lines {
        for field in [
            "prompt_tps=",
            "generation_tps=",
            "total_tokens=",
            "latency_ms=",
            "finish_reason=",
        ] {
            assert!(l.contains(field), "{l}");
        }
    }
}

#[test]
fn sixty_four_streams_at_once_each_end_once_with_single_request_output() {
    const CLIENTS: usize = 64;
    const MAX_TOKENS: usize = 20;
    let singles = answers_alone(MAX_TOKENS);
    let server = Server::start(&["--max-batch-size", "16"]);
    let children: Vec<(usize, Child)> = (0..CLIENTS)
        .map(|i| {
            let q = i % common::QUESTIONS.len();
            (
                q,
                server.stream(
                    "/v1/chat/completions",
                    &chat_body(common::QUESTIONS[q], MAX_TOKENS, true),
                ),
            )
        })
        .collect();
    // Each client's output is read on its own thread while this one watches the batch hold
    // many of them at once. No deadline: how soon it fills depends on the machine's load
    // (a CI run sharing 2 cores with another test's server once saw only 4 in 20 s), not on
    // the engine; it is watched until every client is done.
    let readers: Vec<(usize, std::thread::JoinHandle<std::process::Output>)> = children
        .into_iter()
        .map(|(q, child)| {
            (
                q,
                std::thread::spawn(move || child.wait_with_output().unwrap()),
            )
        })
        .collect();
    let mut most_running = 0.0f64;
    while most_running < 8.0 && !readers.iter().all(|(_, r)| r.is_finished()) {
        most_running = most_running.max(server.metric("convoy_requests_running"));
        std::thread::sleep(Duration::from_millis(20));
    }
    for (i, (q, reader)) in readers.into_iter().enumerate() {
        let out = reader.join().unwrap();
        assert!(out.status.success(), "client {i}: curl failed");
        let sse = parse_sse(&String::from_utf8(out.stdout).unwrap());
        assert_eq!(sse.done, 1, "client {i}: [DONE] {} times", sse.done);
        assert!(sse.done_last, "client {i}: data after [DONE]");
        let (text, reasons) = stream_text(&sse);
        assert_eq!(reasons.len(), 1, "client {i}: finish reasons {reasons:?}");
        assert_eq!(text, singles[q], "client {i} (question {q})");
        assert_eq!(
            sse.chunks[0]["choices"][0]["delta"]["role"], "assistant",
            "client {i}"
        );
        let ids: std::collections::HashSet<&str> = sse
            .chunks
            .iter()
            .map(|c| c["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids.len(), 1, "client {i}: one id per stream");
    }
    assert!(
        most_running >= 8.0,
        "the streams never shared a batch (at most {most_running} running)"
    );
    let m = server.metrics();
    let finished: f64 = ["stop", "length"]
        .iter()
        .map(|r| {
            m.get(&format!(
                "convoy_http_requests_finished_total{{reason=\"{r}\"}}"
            ))
            .copied()
            .unwrap_or(0.0)
        })
        .sum();
    assert_eq!(finished, CLIENTS as f64, "{m:?}");
    assert_eq!(server.wait_log_lines(CLIENTS).len(), CLIENTS);
}

/// Reads a streaming curl's stdout until `n` data lines have arrived.
fn read_data_lines(child: &mut Child, n: usize) -> String {
    let mut out = child.stdout.take().unwrap();
    let mut text = String::new();
    let mut buf = [0u8; 4096];
    while text.matches("data: ").count() < n {
        let k = out.read(&mut buf).unwrap();
        assert!(k > 0, "stream ended early: {text}");
        text.push_str(&String::from_utf8_lossy(&buf[..k]));
    }
    child.stdout = Some(out);
    text
}

#[test]
fn disconnect_cancels_full_queue_answers_503_and_sigterm_ends_streams() {
    let server = Server::start(&["--max-batch-size", "1", "--max-waiting", "1"]);
    let long = |q: &str| {
        json!({"messages": [{"role": "user", "content": q}], "max_tokens": 2000,
               "ignore_eos": true, "stream": true})
    };

    // A client that goes away mid-stream: its request is cancelled within a step or two.
    let mut gone = server.stream("/v1/chat/completions", &long("Tell me a story."));
    read_data_lines(&mut gone, 4);
    gone.kill().unwrap();
    gone.wait().unwrap();
    server.wait_metrics("the cancel", |m| {
        m.get("convoy_http_requests_finished_total{reason=\"cancelled\"}") == Some(&1.0)
            && m.get("convoy_requests_running") == Some(&0.0)
    });
    assert_eq!(server.metric("convoy_http_client_disconnects_total"), 1.0);
    let generated = server.metric("convoy_engine_tokens_generated_total");
    assert!(
        generated < 100.0,
        "{generated} tokens generated for a stream dropped after 3"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        server.metric("convoy_engine_tokens_generated_total"),
        generated,
        "still generating"
    );

    // One running, one waiting: the next is refused with 503 and Retry-After.
    let mut running = server.stream("/v1/chat/completions", &long("Count to a thousand."));
    let first = read_data_lines(&mut running, 1);
    let mut waiting = server.stream("/v1/chat/completions", &long("Name every city."));
    server.wait_metrics("one waiting", |m| {
        m.get("convoy_requests_waiting") == Some(&1.0)
    });
    let (code, headers, body) = server.curl(
        "/v1/chat/completions",
        &[
            "-d",
            &json!({"messages": [{"role": "user", "content": "hi"}]}).to_string(),
        ],
    );
    assert_eq!(code, 503, "{body}");
    assert!(
        headers.to_ascii_lowercase().contains("retry-after: 1"),
        "{headers}"
    );
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], "overloaded", "{v}");

    // SIGTERM: both streams end (cancelled, said in an error chunk), each with one [DONE],
    // and the server exits cleanly.
    let at = Instant::now();
    // SAFETY: a plain kill(2) on our child's pid.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
    for (name, child, head) in [
        ("running", &mut running, first),
        ("waiting", &mut waiting, String::new()),
    ] {
        let mut rest = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut rest)
            .unwrap();
        let sse = parse_sse(&(head + &rest));
        assert_eq!((sse.done, sse.done_last), (1, true), "{name}");
        let last = sse.chunks.last().unwrap();
        assert_eq!(last["error"]["code"], "cancelled", "{name}: {last}");
        child.wait().unwrap();
    }
    let mut server = server;
    let status = server.child.wait().unwrap();
    assert!(status.success(), "convoy-server exited with {status}");
    assert!(
        at.elapsed() < Duration::from_secs(20),
        "shutdown took {:?}",
        at.elapsed()
    );
    let lines = server.wait_log_lines(3);
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.ends_with("finish_reason=cancelled"))
            .count(),
        3,
        "{lines:?}"
    );
}

#[test]
fn the_openai_python_client_works_against_it() {
    let server = Server::start(&["--max-batch-size", "8"]);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new("bash")
        .arg(root.join("scripts/test-server.sh"))
        .arg(&server.url)
        .current_dir(&root)
        .output()
        .expect("run scripts/test-server.sh");
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "scripts/test-server.sh failed ({}):\n{output}",
        out.status
    );
    eprintln!("{output}");
}

/// A small xorshift generator: the test's random choices, reproducible from the seed it prints.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What a random client does.
#[derive(Debug, Clone, Copy)]
enum Fate {
    /// Reads the whole answer.
    Complete,
    /// Streams, and goes away after this many data lines.
    LeaveAfterLines(usize),
    /// Goes away after this many milliseconds, wherever its request is.
    LeaveAfterMs(u64),
}

#[test]
fn random_clients_leaving_at_any_moment_lose_and_leak_nothing() {
    let seed = std::env::var("CONVOY_SERVER_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("seed {seed} (rerun with CONVOY_SERVER_SEED={seed})");
    const MAX: usize = 24;
    let singles = answers_alone(MAX);
    let server = Arc::new(Server::start(&[
        "--max-batch-size",
        "6",
        "--prefill-chunk",
        "64",
    ]));
    let mut rng = Rng(seed);
    let clients: Vec<_> = (0..40)
        .map(|i| {
            let q = rng.below(common::QUESTIONS.len() as u64) as usize;
            let max_tokens = 1 + rng.below(MAX as u64) as usize;
            let stream = rng.below(3) > 0;
            let fate = match rng.below(3) {
                0 => Fate::Complete,
                1 if stream => Fate::LeaveAfterLines(rng.below(6) as usize),
                _ => Fate::LeaveAfterMs(rng.below(2500)),
            };
            let delay = Duration::from_millis(rng.below(4000));
            let server = server.clone();
            std::thread::spawn(move || {
                std::thread::sleep(delay);
                let body = chat_body(common::QUESTIONS[q], max_tokens, stream);
                let mut child = server.stream("/v1/chat/completions", &body);
                let mut head = String::new();
                match fate {
                    Fate::Complete => {}
                    Fate::LeaveAfterLines(n) => {
                        let mut out = child.stdout.take().unwrap();
                        let mut buf = [0u8; 4096];
                        while head.matches("data: ").count() < n {
                            match out.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(k) => head.push_str(&String::from_utf8_lossy(&buf[..k])),
                            }
                        }
                        let _ = child.kill();
                    }
                    Fate::LeaveAfterMs(ms) => {
                        std::thread::sleep(Duration::from_millis(ms));
                        let _ = child.kill();
                    }
                }
                let out = child.wait_with_output().unwrap();
                let text = head + &String::from_utf8_lossy(&out.stdout);
                (i, q, max_tokens, stream, fate, out.status.success(), text)
            })
        })
        .collect();
    let mut left = 0;
    for c in clients {
        let (i, q, max_tokens, stream, fate, success, text) = c.join().unwrap();
        let what = format!(
            "client {i} ({fate:?}, stream {stream}, max_tokens {max_tokens}, question {q})"
        );
        if !matches!(fate, Fate::Complete) {
            left += 1;
        }
        if !success {
            assert!(
                !matches!(fate, Fate::Complete),
                "{what}: curl failed: {text}"
            );
            continue;
        }
        // An answer read to its end (killed clients that had already finished included).
        let answer = if stream {
            let sse = parse_sse(&text);
            assert_eq!((sse.done, sse.done_last), (1, true), "{what}: {text}");
            let (answer, reasons) = stream_text(&sse);
            assert_eq!(reasons.len(), 1, "{what}");
            answer
        } else {
            let v: Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{what}: {e}: {text}"));
            let usage = &v["usage"]["completion_tokens"];
            assert!(
                usage.as_u64().unwrap() as usize <= max_tokens,
                "{what}: {v}"
            );
            v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        assert!(
            singles[q].starts_with(&answer),
            "{what}: {answer:?} is not how the answer alone begins: {:?}",
            singles[q]
        );
    }
    // Every request the server took ends, exactly once, and none stays held.
    server.wait_metrics("every request to end", |m| {
        m.get("convoy_requests_running") == Some(&0.0)
            && m.get("convoy_requests_waiting") == Some(&0.0)
            && m.get("convoy_requests_held") == Some(&0.0)
    });
    std::thread::sleep(Duration::from_millis(300));
    let m = server.metrics();
    let reason = |r: &str| {
        m.get(&format!(
            "convoy_http_requests_finished_total{{reason=\"{r}\"}}"
        ))
        .copied()
        .unwrap_or(0.0)
    };
    let finished = reason("stop") + reason("length") + reason("cancelled") + reason("error");
    assert_eq!(reason("error"), 0.0, "{m:?}");
    assert_eq!(
        m["convoy_engine_requests_finished_total"], finished,
        "{m:?}"
    );
    assert_eq!(
        server.wait_log_lines(finished as usize).len() as f64,
        finished,
        "one log line per request"
    );
    assert_eq!(
        m["convoy_http_requests_in_flight"], 0.0,
        "the server still routes requests"
    );
    let disconnects = m["convoy_http_client_disconnects_total"];
    assert!(reason("cancelled") <= disconnects, "{m:?}");
    assert!(
        disconnects <= left as f64,
        "{disconnects} disconnects from {left} clients leaving"
    );
    eprintln!(
        "{finished} requests ended: {} cancelled after {disconnects} disconnects ({left} clients left)",
        reason("cancelled")
    );
}
