//! AFL++ harness: the input bytes are a program of C ABI calls (`convoy_*`) on one engine.
//!
//! The engine is created once per process, lazily on the first input (after AFL's fork
//! server has forked), on the real test model with a small configuration. Each input then
//! submits, polls, cancels and inspects requests with fuzzed arguments (NULL pointers, invalid
//! UTF-8, out-of-range sampling parameters, unknown ids, tiny error buffers) and ends by
//! cancelling and draining every request it submitted, so inputs are independent.
//!
//! Crashes (panics here) mean the API broke a promise of include/convoy.h: a PANIC or
//! ENGINE_FAILED status, a request that never finishes or finishes twice, an event that
//! breaks its documented shape, an error message that is not NUL-terminated.
use std::ffi::{c_char, CStr};
use std::path::PathBuf;
use std::ptr::{null, null_mut};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use convoy::ffi::*;

/// Most tokens a request with a "small" max_tokens asks for.
const SMALL_MAX_TOKENS: u32 = 4;
/// A request must finish this soon after it was cancelled.
const DRAIN_DEADLINE: Duration = Duration::from_secs(30);

struct EnginePtr(*mut convoy_engine);
// SAFETY: convoy_engine is documented thread-safe for `const` use; only this thread uses it.
unsafe impl Send for EnginePtr {}
unsafe impl Sync for EnginePtr {}

static ENGINE: OnceLock<EnginePtr> = OnceLock::new();

fn model_path() -> PathBuf {
    if let Some(p) = std::env::var_os("CONVOY_MODEL") {
        return p.into();
    }
    let cache = std::env::var_os("CONVOY_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("convoy")))
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/convoy"));
    cache.join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn engine() -> *const convoy_engine {
    ENGINE
        .get_or_init(|| unsafe {
            let mut cfg = std::mem::zeroed::<convoy_engine_config>();
            check(
                convoy_engine_config_init(&mut cfg, std::mem::size_of::<convoy_engine_config>()),
                "config_init",
            );
            cfg.max_batch_size = 4;
            cfg.max_waiting = 8;
            cfg.max_context = 128;
            let path = model_path();
            let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
            let mut e = null_mut();
            let st = convoy_engine_create(c.as_ptr(), &cfg, &mut e);
            assert_eq!(st, convoy_status::Ok, "engine_create: {}", last_error());
            EnginePtr(e)
        })
        .0
}

fn last_error() -> String {
    let mut buf = [0 as c_char; 512];
    unsafe { convoy_last_error_message(buf.as_mut_ptr(), buf.len()) };
    unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// Statuses that are always bugs.
fn check(status: convoy_status, what: &str) -> convoy_status {
    assert!(
        !matches!(status, convoy_status::Panic | convoy_status::EngineFailed),
        "{what}: {status:?}: {}",
        last_error()
    );
    if status != convoy_status::Ok && status != convoy_status::Timeout {
        let mut probe = [0 as c_char; 1];
        let n = unsafe { convoy_last_error_message(probe.as_mut_ptr(), 1) };
        assert!(n > 0, "{what}: {status:?} without an error message");
        assert_eq!(probe[0], 0, "a one-byte buffer must hold just the NUL");
    }
    status
}

/// Reads the input bytes as a little program; past the end it yields zeros.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn done(&self) -> bool {
        self.0.is_empty()
    }
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn u64(&mut self) -> u64 {
        (self.u32() as u64) | ((self.u32() as u64) << 32)
    }
    /// Up to 31 raw bytes (any values, NULs included).
    fn bytes(&mut self) -> Vec<u8> {
        let n = (self.u8() & 31) as usize;
        (0..n).map(|_| self.u8()).collect()
    }
    /// A NUL-terminated C string of raw bytes (cut at an embedded NUL, may be invalid UTF-8).
    fn c_string(&mut self) -> Vec<u8> {
        let mut b = self.bytes();
        b.push(0);
        b
    }
    fn float(&mut self, usual: &[f32]) -> f32 {
        match self.u8() {
            0 => f32::NAN,
            1 => f32::INFINITY,
            2 => f32::NEG_INFINITY,
            3 => -1.0,
            4 => 1e30,
            5 => f32::from_bits(self.u32()),
            6 => f32::MIN_POSITIVE,
            k => usual[k as usize % usual.len()],
        }
    }
    fn token(&mut self) -> u32 {
        match self.u8() % 8 {
            0 => 49_151,
            1 => 49_152,
            2 => u32::MAX,
            3 => self.u32(),
            4 => 0,
            5 => 2, // <|im_end|>: end of sequence
            _ => self.u8() as u32 * 100 + self.u8() as u32,
        }
    }
}

/// Storage that must outlive one call's pointers.
#[derive(Default)]
struct Params {
    raw: Option<convoy_request_params>,
    stop_ids: Vec<u32>,
    stop_strings: Vec<Vec<u8>>,
    stop_ptrs: Vec<*const c_char>,
}

impl Params {
    fn read(input: &mut Input) -> Params {
        let mut p = Params::default();
        let kind = input.u8();
        if kind.is_multiple_of(4) {
            return p; // NULL params: the defaults (256 tokens; cancelled at the end)
        }
        let mut raw = unsafe { std::mem::zeroed::<convoy_request_params>() };
        check(
            unsafe {
                convoy_request_params_init(&mut raw, std::mem::size_of::<convoy_request_params>())
            },
            "params_init",
        );
        // A caller's struct may be smaller (older header: the rest keeps its defaults),
        // larger (newer header: the tail is ignored), or have no size set (refused).
        raw.struct_size = match input.u8() % 16 {
            0 => 0,
            1 => input.u8() as u32,
            2 => std::mem::size_of::<convoy_request_params>() as u32 + 64,
            _ => std::mem::size_of::<convoy_request_params>() as u32,
        };
        raw.max_tokens = match input.u8() % 8 {
            0 => 0,
            1 => u32::MAX,
            2 => input.u32(),
            k => (k as u32) % SMALL_MAX_TOKENS + 1,
        };
        if kind & 4 != 0 {
            raw.temperature = input.float(&[0.0, 0.7, 1.0, 2.0, 100.0]);
            raw.top_k = match input.u8() % 4 {
                0 => 0,
                1 => u32::MAX,
                _ => input.u8() as u32,
            };
            raw.top_p = input.float(&[1.0, 0.9, 0.5, 0.0, 2.0]);
            raw.min_p = input.float(&[0.0, 0.05, 1.0, 1.5]);
            raw.repetition_penalty = input.float(&[1.0, 1.3, 0.0, 0.5, 1e9]);
            raw.presence_penalty = input.float(&[0.0, 1.0, -2.0, 1e9]);
            raw.frequency_penalty = input.float(&[0.0, 1.0, -2.0, 1e9]);
            raw.has_seed = input.u8() & 1 == 1;
            raw.seed = input.u64();
        }
        raw.ignore_eos = kind & 8 != 0;
        if kind & 16 != 0 {
            let n = input.u8() % 4;
            p.stop_ids = (0..n).map(|_| input.token()).collect();
            raw.n_stop_token_ids = p.stop_ids.len();
            if input.u8() == 0 {
                raw.n_stop_token_ids = 3; // NULL with a length
            } else {
                raw.stop_token_ids = p.stop_ids.as_ptr();
            }
        }
        if kind & 32 != 0 {
            let n = input.u8() % 3;
            p.stop_strings = (0..n).map(|_| input.c_string()).collect();
            p.stop_ptrs = p
                .stop_strings
                .iter()
                .map(|s| s.as_ptr() as *const c_char)
                .collect();
            if input.u8() == 1 {
                p.stop_ptrs.push(null()); // a NULL string in the list
            }
            raw.n_stop_strings = p.stop_ptrs.len();
            if input.u8() == 0 && !p.stop_ptrs.is_empty() {
                raw.stop_strings = null();
            } else {
                raw.stop_strings = p.stop_ptrs.as_ptr();
            }
        }
        p.raw = Some(raw);
        p
    }

    fn ptr(&self) -> *const convoy_request_params {
        self.raw.as_ref().map_or(null(), |r| r as *const _)
    }
}

/// One request this input submitted, and what was seen of it.
struct Live {
    id: u64,
    finished: u32,
    tokens: u32,
}

struct Run {
    engine: *const convoy_engine,
    live: Vec<Live>,
}

impl Run {
    fn submitted(&mut self, status: convoy_status, id: u64) {
        if std::env::var_os("CONVOY_FUZZ_VERBOSE").is_some() {
            eprintln!("c_api: submit: {status:?} {}", last_error());
        }
        if status == convoy_status::Ok {
            assert!(
                self.live.iter().all(|l| l.id != id),
                "id {id} handed out twice"
            );
            self.live.push(Live {
                id,
                finished: 0,
                tokens: 0,
            });
        }
    }

    /// An id to poll or cancel: one of ours, or anything.
    fn pick_id(&self, input: &mut Input) -> u64 {
        let k = input.u8();
        if k < 192 && !self.live.is_empty() {
            self.live[k as usize % self.live.len()].id
        } else if k < 224 {
            k as u64
        } else {
            input.u64()
        }
    }

    fn poll(&mut self, id: u64, timeout_ms: u32) -> convoy_status {
        let mut ev = new_event();
        let st = check(
            unsafe { convoy_engine_poll(self.engine, id, timeout_ms, ev.as_mut_ptr()) },
            "poll",
        );
        self.record(st, id, ev)
    }

    /// Polls any request; the event must belong to a live request of this run.
    fn poll_any(&mut self, timeout_ms: u32) -> convoy_status {
        let mut ev = new_event();
        let st = check(
            unsafe { convoy_engine_poll_any(self.engine, timeout_ms, ev.as_mut_ptr()) },
            "poll_any",
        );
        let id = if st == convoy_status::Ok {
            // SAFETY: written in full (struct_size is this header's size).
            unsafe { (*ev.as_ptr()).request_id }
        } else {
            0
        };
        match st {
            convoy_status::Ok => self.record(st, id, ev),
            other => other,
        }
    }

    fn record(
        &mut self,
        st: convoy_status,
        id: u64,
        ev: std::mem::MaybeUninit<convoy_event>,
    ) -> convoy_status {
        let live = self.live.iter_mut().find(|l| l.id == id);
        match (st, live) {
            (convoy_status::Ok, Some(l)) => {
                // SAFETY: poll wrote the event (it returned OK).
                let ev = unsafe { ev.assume_init() };
                assert!(ev.struct_size as usize <= std::mem::size_of::<convoy_event>());
                assert_eq!(ev.request_id, id);
                assert_eq!(l.finished, 0, "event for request {id} after FINISHED");
                assert!(!ev.text.is_null() && !ev.error.is_null());
                let text = unsafe { CStr::from_ptr(ev.text) };
                assert_eq!(text.to_bytes().len(), ev.text_len, "text_len");
                assert!(
                    std::str::from_utf8(text.to_bytes()).is_ok(),
                    "text not UTF-8"
                );
                match ev.kind {
                    convoy_event_kind::Token => {
                        assert!(ev.stats.is_null(), "stats on a TOKEN event");
                        l.tokens += 1;
                        assert!(
                            ev.token < 49_152,
                            "token {} outside the vocabulary",
                            ev.token
                        );
                    }
                    convoy_event_kind::Finished => {
                        l.finished += 1;
                        let err = unsafe { CStr::from_ptr(ev.error) }.to_string_lossy();
                        assert!(
                            ev.finish_reason != convoy_finish_reason::Error,
                            "request {id} failed: {err}"
                        );
                        assert!(!ev.stats.is_null(), "no stats on FINISHED");
                        let stats = unsafe { &*ev.stats };
                        assert!(
                            stats.generated_tokens >= l.tokens,
                            "stats say {} tokens, {} TOKEN events seen",
                            stats.generated_tokens,
                            l.tokens
                        );
                    }
                }
            }
            (convoy_status::Ok, None) => panic!("an event for id {id}, never submitted here"),
            (convoy_status::UnknownRequest, Some(l)) => {
                assert_eq!(l.finished, 1, "request {id} unknown before its FINISHED")
            }
            _ => {}
        }
        st
    }

    fn step(&mut self, input: &mut Input) {
        let e = self.engine;
        let mut id = 0u64;
        match input.u8() % 18 {
            0 | 1 => {
                let prompt = input.c_string();
                let params = Params::read(input);
                let p = if input.u8() == 0 {
                    null()
                } else {
                    prompt.as_ptr() as *const c_char
                };
                let st = unsafe { convoy_engine_submit_text(e, p, params.ptr(), &mut id) };
                self.submitted(check(st, "submit_text"), id);
            }
            2 | 3 => {
                let n = input.u8() % 9;
                let tokens: Vec<u32> = (0..n).map(|_| input.token()).collect();
                let params = Params::read(input);
                let (ptr, len) = match input.u8() {
                    0 => (null(), tokens.len().max(1)),
                    1 => (tokens.as_ptr(), 0),
                    _ => (tokens.as_ptr(), tokens.len()),
                };
                let st = unsafe { convoy_engine_submit_tokens(e, ptr, len, params.ptr(), &mut id) };
                self.submitted(check(st, "submit_tokens"), id);
            }
            4 | 5 => {
                let n = input.u8() % 4;
                let strings: Vec<(Vec<u8>, Vec<u8>)> = (0..n)
                    .map(|_| {
                        let role = match input.u8() % 5 {
                            0 => b"system\0".to_vec(),
                            1 => b"user\0".to_vec(),
                            2 => b"assistant\0".to_vec(),
                            _ => input.c_string(),
                        };
                        (role, input.c_string())
                    })
                    .collect();
                let nulls = input.u8();
                let msgs: Vec<convoy_chat_message> = strings
                    .iter()
                    .enumerate()
                    .map(|(i, (r, c))| convoy_chat_message {
                        struct_size: std::mem::size_of::<convoy_chat_message>() as u32,
                        role: if nulls == 1 + 2 * i as u8 {
                            null()
                        } else {
                            r.as_ptr() as _
                        },
                        content: if nulls == 2 + 2 * i as u8 {
                            null()
                        } else {
                            c.as_ptr() as _
                        },
                    })
                    .collect();
                let params = Params::read(input);
                let ptr = if nulls == 0 { null() } else { msgs.as_ptr() };
                let st =
                    unsafe { convoy_engine_submit_chat(e, ptr, msgs.len(), params.ptr(), &mut id) };
                self.submitted(check(st, "submit_chat"), id);
            }
            6 | 7 => {
                let id = self.pick_id(input);
                let timeout = if input.u8() < 240 { 0 } else { 2 };
                self.poll(id, timeout);
            }
            8 => {
                let id = self.pick_id(input);
                let st = check(unsafe { convoy_engine_cancel(e, id) }, "cancel");
                if st == convoy_status::Ok {
                    let l = self.live.iter().find(|l| l.id == id);
                    assert!(
                        l.is_some_and(|l| l.finished == 0),
                        "cancel of {id} accepted"
                    );
                }
            }
            9 => {
                let mut s = unsafe { std::mem::zeroed::<convoy_engine_stats>() };
                s.struct_size = std::mem::size_of::<convoy_engine_stats>() as u32;
                let st = match input.u8() % 3 {
                    0 => unsafe { convoy_engine_get_stats(null(), &mut s) },
                    1 => unsafe { convoy_engine_get_stats(e, null_mut()) },
                    _ => unsafe { convoy_engine_get_stats(e, &mut s) },
                };
                check(st, "get_stats");
                assert_eq!(unsafe { convoy_engine_context_length(null()) }, 0);
                assert!(unsafe { convoy_engine_context_length(e) } > 0);
            }
            10 => {
                let s = convoy_status_str(input.u32());
                assert!(!s.is_null());
                assert!(!unsafe { CStr::from_ptr(s) }.to_bytes().is_empty());
                let v = unsafe { CStr::from_ptr(convoy_version()) };
                assert!(!v.to_bytes().is_empty());
                let b = unsafe { CStr::from_ptr(convoy_backend()) };
                assert!(!b.to_bytes().is_empty());
            }
            11 => {
                let len = (input.u8() % 8) as usize;
                let mut buf = vec![0x55u8 as c_char; 8];
                let full = unsafe { convoy_last_error_message(null_mut(), 0) };
                let ptr = if len == 0 && input.u8() & 1 == 0 {
                    null_mut()
                } else {
                    buf.as_mut_ptr()
                };
                let n = unsafe { convoy_last_error_message(ptr, len) };
                assert_eq!(n, full, "length differs between calls");
                if len > 0 {
                    let written = n.min(len - 1);
                    assert_eq!(buf[written], 0, "not NUL-terminated");
                    assert!(buf[len..].iter().all(|&c| c == 0x55), "wrote past len");
                } else {
                    assert!(buf.iter().all(|&c| c == 0x55), "wrote with len 0");
                }
            }
            12 => {
                // NULL pointers everywhere else.
                let mut ev = new_event();
                let ev = ev.as_mut_ptr();
                let which = input.u8() % 6;
                let st = unsafe {
                    match which {
                        0 => convoy_engine_poll(null(), 1, 0, ev),
                        1 => convoy_engine_poll(e, 1, 0, null_mut()),
                        2 => convoy_engine_submit_text(null(), c"x".as_ptr(), null(), &mut id),
                        3 => convoy_engine_submit_text(e, c"x".as_ptr(), null(), null_mut()),
                        4 => convoy_engine_cancel(null(), 1),
                        _ => convoy_engine_config_init(null_mut(), 64),
                    }
                };
                assert_eq!(check(st, "NULL argument"), convoy_status::NullPointer);
                assert_eq!(
                    unsafe { convoy_request_params_init(null_mut(), 64) },
                    convoy_status::NullPointer
                );
            }
            14 | 15 => {
                let timeout = if input.u8() < 240 { 0 } else { 2 };
                self.poll_any(timeout);
            }
            16 => self.utilities(input),
            _ => {
                // Let the engine run a little.
                std::thread::sleep(Duration::from_millis((input.u8() % 4) as u64));
            }
        }
    }

    /// Tokenize, detokenize, render a chat and model info, with fuzzed buffer sizes: the
    /// snprintf-style outputs never write past what the caller said it has.
    fn utilities(&mut self, input: &mut Input) {
        let e = self.engine;
        const CANARY: u32 = 0xA5A5_A5A5;
        match input.u8() % 4 {
            0 => {
                let text = input.c_string();
                let cap = (input.u8() % 12) as usize;
                let mut buf = vec![CANARY; 16];
                let mut n = usize::MAX;
                let ptr = if cap == 0 && input.u8() & 1 == 0 {
                    null_mut()
                } else {
                    buf.as_mut_ptr()
                };
                let st = unsafe {
                    convoy_engine_tokenize(
                        e,
                        text.as_ptr() as _,
                        input.u8() & 1 == 0,
                        ptr,
                        cap,
                        &mut n,
                    )
                };
                if check(st, "tokenize") == convoy_status::Ok {
                    assert!(
                        buf[n.min(cap)..].iter().all(|&c| c == CANARY),
                        "tokenize wrote past capacity"
                    );
                }
            }
            1 => {
                let n = (input.u8() % 9) as usize;
                let tokens: Vec<u32> = (0..n).map(|_| input.token()).collect();
                let len = (input.u8() % 12) as usize;
                let mut buf = vec![0x55u8 as c_char; 16];
                let mut out = usize::MAX;
                let st = unsafe {
                    convoy_engine_detokenize(
                        e,
                        tokens.as_ptr(),
                        n,
                        input.u8() & 1 == 0,
                        buf.as_mut_ptr(),
                        len,
                        &mut out,
                    )
                };
                if check(st, "detokenize") == convoy_status::Ok && len > 0 {
                    assert_eq!(buf[out.min(len - 1)], 0, "not NUL-terminated");
                    assert!(
                        buf[len..].iter().all(|&c| c == 0x55),
                        "detokenize wrote past len"
                    );
                }
            }
            2 => {
                let content = input.c_string();
                let msg = convoy_chat_message {
                    struct_size: match input.u8() % 8 {
                        0 => input.u8() as u32,
                        _ => std::mem::size_of::<convoy_chat_message>() as u32,
                    },
                    role: c"user".as_ptr(),
                    content: content.as_ptr() as _,
                };
                let len = (input.u8() % 200) as usize;
                let mut buf = vec![0x55u8 as c_char; 256];
                let mut out = usize::MAX;
                let st = unsafe {
                    convoy_engine_render_chat(e, &msg, 1, true, buf.as_mut_ptr(), len, &mut out)
                };
                if check(st, "render_chat") == convoy_status::Ok && len > 0 {
                    assert_eq!(buf[out.min(len - 1)], 0, "not NUL-terminated");
                    assert!(
                        buf[len..].iter().all(|&c| c == 0x55),
                        "render_chat wrote past len"
                    );
                }
            }
            _ => {
                // A caller's struct of any size: convoy writes at most that many bytes.
                let full = std::mem::size_of::<convoy_model_info>();
                let size = match input.u8() % 4 {
                    0 => (input.u8() as usize) % (full + 16),
                    _ => full,
                };
                let mut buf = vec![0xA5u8; full + 32];
                unsafe { std::ptr::write_unaligned(buf.as_mut_ptr() as *mut u32, size as u32) };
                let st = unsafe {
                    convoy_engine_model_info(e, buf.as_mut_ptr() as *mut convoy_model_info)
                };
                if check(st, "model_info") == convoy_status::Ok {
                    // Whole fields only: struct_size becomes the end of the last field written.
                    let got =
                        unsafe { std::ptr::read_unaligned(buf.as_ptr() as *const u32) } as usize;
                    assert!(
                        (4..=size.min(full)).contains(&got),
                        "struct_size {got} after the call (given {size})"
                    );
                    assert!(
                        buf[got..].iter().all(|&b| b == 0xA5),
                        "model_info wrote past struct_size"
                    );
                } else {
                    assert!(size < 4, "model_info refused size {size}");
                }
            }
        }
    }

    /// Cancels every request of this input and polls each until its FINISHED.
    fn drain(&mut self) {
        for i in 0..self.live.len() {
            let l = &self.live[i];
            if l.finished == 0 {
                let st = check(unsafe { convoy_engine_cancel(self.engine, l.id) }, "cancel");
                assert!(
                    matches!(st, convoy_status::Ok),
                    "cancel of live request {}: {st:?}",
                    l.id
                );
            }
        }
        let start = Instant::now();
        for i in 0..self.live.len() {
            let id = self.live[i].id;
            while self.live[i].finished == 0 {
                assert!(
                    start.elapsed() < DRAIN_DEADLINE,
                    "request {id} never finished"
                );
                self.poll(id, 1000);
            }
            assert_eq!(self.live[i].finished, 1);
            assert_eq!(self.poll(id, 0), convoy_status::UnknownRequest);
        }
    }
}

/// An event with only its `struct_size` set, as a host prepares it.
fn new_event() -> std::mem::MaybeUninit<convoy_event> {
    let mut ev = std::mem::MaybeUninit::<convoy_event>::uninit();
    // SAFETY: writes the first field of the (uninitialised) struct.
    unsafe {
        std::ptr::addr_of_mut!((*ev.as_mut_ptr()).struct_size)
            .write(std::mem::size_of::<convoy_event>() as u32)
    };
    ev
}

fn main() {
    let verbose = std::env::var_os("CONVOY_FUZZ_VERBOSE").is_some();
    afl::fuzz!(|data: &[u8]| {
        let mut input = Input(data);
        let mut run = Run {
            engine: engine(),
            live: Vec::new(),
        };
        let mut steps = 0;
        while !input.done() && steps < 64 {
            run.step(&mut input);
            steps += 1;
        }
        run.drain();
        if verbose {
            for l in &run.live {
                eprintln!("c_api: request {}: {} tokens, finished", l.id, l.tokens);
            }
            eprintln!("c_api: {steps} steps, {} requests", run.live.len());
        }
    });
}
