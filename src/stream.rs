//! Per-request event streams between the engine thread and the host's pollers.
//!
//! Guarantees, whatever the host does (several threads polling one id, cancel or release at
//! any moment, engine failure or shutdown with requests in flight):
//! - every request's terminal event (`Finished`) is handed out **exactly once**, to one
//!   poller; every other poller of that id then gets `UnknownRequest`;
//! - a released request's events are dropped at once and none are queued afterwards;
//! - the engine thread closes every stream it has not finished before it exits, so no poller
//!   waits forever.
//!
//! Memory: a stream holds at most `max_tokens + 1` events (one per generated token plus the
//! terminal one), and the engine holds at most `max_requests` streams (submit answers busy
//! beyond that) until their terminal event is polled or they are released.
//!
//! Events can be taken per request ([`Streams::poll`]) or from every request at once
//! ([`Streams::poll_any`]): a ready queue lists the streams that have events waiting, each at
//! most once, in the order they became ready; a stream that still has events after one is
//! taken goes to the back, so one fast request cannot starve the others. Both ways take from
//! the same queues, so exactly-once holds however a host mixes them.
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::request::{Event, FinishReason, RequestId, RequestStats};

#[derive(Default)]
struct State {
    events: VecDeque<Event>,
    /// The terminal event is queued: nothing follows it.
    closed: bool,
    /// The terminal event was taken by a poller, or the host released the request.
    gone: bool,
    /// The stream has an entry in the ready queue (or its pusher is about to add one).
    listed: bool,
}

/// One request's queue of events.
pub(crate) struct Stream {
    id: RequestId,
    state: Mutex<State>,
    ready: Condvar,
    any: Arc<ReadyQueue>,
}

impl Stream {
    fn new(id: RequestId, any: Arc<ReadyQueue>) -> Self {
        Self {
            id,
            state: Mutex::default(),
            ready: Condvar::new(),
            any,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues an event (engine thread). Ignored once the stream is closed or released.
    /// Returns false if the stream was already closed (a second terminal event would have
    /// broken exactly-once: it is dropped).
    pub(crate) fn push(self: &Arc<Self>, event: Event) -> bool {
        let mut st = self.lock();
        if st.closed {
            return false;
        }
        let terminal = matches!(event, Event::Finished { .. });
        st.closed = terminal;
        let mut list = false;
        if !st.gone {
            st.events.push_back(event);
            list = !st.listed;
            st.listed = true;
        }
        drop(st);
        self.ready.notify_all();
        if list {
            self.any.push(Arc::downgrade(self));
        }
        true
    }

    /// Whether the terminal event has been queued.
    pub(crate) fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Events queued and not yet polled.
    #[cfg(test)]
    fn queued(&self) -> usize {
        self.lock().events.len()
    }
}

/// Streams with events waiting, for [`Streams::poll_any`]. Lock order: this queue's lock may
/// be held while taking a stream's lock, never the other way round.
struct ReadyQueue {
    queue: Mutex<Ready>,
    cv: Condvar,
}

struct Ready {
    entries: VecDeque<Weak<Stream>>,
    /// The engine thread has exited: once the entries are taken, nothing more will come.
    stopped: bool,
    /// Length at which stale entries (streams drained by per-id polls, released or gone)
    /// are swept out, so hosts that never call `poll_any` do not grow the queue.
    sweep_at: usize,
}

const SWEEP_MIN: usize = 64;

impl ReadyQueue {
    fn new() -> Self {
        Self {
            queue: Mutex::new(Ready {
                entries: VecDeque::new(),
                stopped: false,
                sweep_at: SWEEP_MIN,
            }),
            cv: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Ready> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, stream: Weak<Stream>) {
        let mut q = self.lock();
        q.entries.push_back(stream);
        if q.entries.len() >= q.sweep_at {
            q.entries.retain(|w| {
                let Some(s) = w.upgrade() else {
                    return false;
                };
                let mut st = s.lock();
                let keep = !st.gone && !st.events.is_empty();
                if !keep {
                    st.listed = false;
                }
                keep
            });
            q.sweep_at = (2 * q.entries.len()).max(SWEEP_MIN);
        }
        drop(q);
        self.cv.notify_one();
    }
}

/// The live requests' streams (host side).
pub(crate) struct Streams {
    map: Mutex<Registry>,
    max_requests: usize,
    any: Arc<ReadyQueue>,
}

struct Registry {
    streams: HashMap<RequestId, Arc<Stream>>,
    /// Set when the engine thread has exited: no new streams.
    stopped: bool,
}

/// How a registration was refused.
pub(crate) enum Refused {
    /// `max_requests` streams are held.
    Full(usize),
    /// The engine thread has exited.
    Stopped,
}

impl Streams {
    pub(crate) fn new(max_requests: usize) -> Self {
        Self {
            map: Mutex::new(Registry {
                streams: HashMap::new(),
                stopped: false,
            }),
            max_requests,
            any: Arc::new(ReadyQueue::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Creates the stream of a new request and, under the same lock, hands it to `send`
    /// (which queues the submit command), so the engine thread's final sweep cannot miss it.
    /// If `send` fails the stream is removed again.
    #[cfg(test)]
    pub(crate) fn register<E>(
        &self,
        id: RequestId,
        send: impl FnOnce(Arc<Stream>) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), std::result::Result<Refused, E>> {
        self.register_many(&[id], |mut streams| send(streams.remove(0)))
    }

    /// [`register`](Self::register) for several requests at once: all or none (refused as
    /// `Full` unless every one fits under `max_requests`), with one `send` for all of them.
    pub(crate) fn register_many<E>(
        &self,
        ids: &[RequestId],
        send: impl FnOnce(Vec<Arc<Stream>>) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), std::result::Result<Refused, E>> {
        let mut reg = self.lock();
        if reg.stopped {
            return Err(Ok(Refused::Stopped));
        }
        if reg.streams.len().saturating_add(ids.len()) > self.max_requests {
            return Err(Ok(Refused::Full(reg.streams.len())));
        }
        let streams: Vec<Arc<Stream>> = ids
            .iter()
            .map(|&id| Arc::new(Stream::new(id, self.any.clone())))
            .collect();
        send(streams.clone()).map_err(Err)?;
        for (&id, stream) in ids.iter().zip(streams) {
            reg.streams.insert(id, stream);
        }
        Ok(())
    }

    /// Most requests held at once.
    pub(crate) fn capacity(&self) -> usize {
        self.max_requests
    }

    /// Requests held (live, or ended with events not yet polled).
    pub(crate) fn len(&self) -> usize {
        self.lock().streams.len()
    }

    fn get(&self, id: RequestId) -> Result<Arc<Stream>> {
        self.lock()
            .streams
            .get(&id)
            .cloned()
            .ok_or(Error::UnknownRequest(id))
    }

    /// Whether `id` is held and its terminal event not yet queued.
    pub(crate) fn is_open(&self, id: RequestId) -> Result<bool> {
        Ok(!self.get(id)?.is_closed())
    }

    /// Waits up to `timeout` (`None`: forever) for the next event of `id`. `Ok(None)` on
    /// timeout. The poller that takes the terminal event removes the request; pollers of a
    /// removed request get `UnknownRequest`.
    pub(crate) fn poll(&self, id: RequestId, timeout: Option<Duration>) -> Result<Option<Event>> {
        let stream = self.get(id)?;
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let mut st = stream.lock();
        loop {
            if st.gone {
                return Err(Error::UnknownRequest(id));
            }
            if let Some(event) = st.events.pop_front() {
                if matches!(event, Event::Finished { .. }) {
                    st.gone = true;
                    drop(st);
                    stream.ready.notify_all();
                    self.forget(id, &stream);
                }
                return Ok(Some(event));
            }
            st = match deadline {
                None => stream.ready.wait(st).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Ok(None);
                    }
                    stream
                        .ready
                        .wait_timeout(st, d - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        }
    }

    /// Waits up to `timeout` (`None`: forever) for the next event of any request, taking
    /// requests in the order their events became ready (round robin among busy requests).
    /// `Ok(None)` on timeout; `ShutDown` at once when the engine thread has exited and every
    /// event has been taken. The poller that takes a terminal event removes the request.
    pub(crate) fn poll_any(&self, timeout: Option<Duration>) -> Result<Option<Event>> {
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        loop {
            let entry = {
                let mut q = self.any.lock();
                loop {
                    if let Some(e) = q.entries.pop_front() {
                        break e;
                    }
                    if q.stopped {
                        return Err(Error::ShutDown);
                    }
                    q = match deadline {
                        None => self.any.cv.wait(q).unwrap_or_else(|p| p.into_inner()),
                        Some(d) => {
                            let now = Instant::now();
                            if now >= d {
                                return Ok(None);
                            }
                            self.any
                                .cv
                                .wait_timeout(q, d - now)
                                .unwrap_or_else(|p| p.into_inner())
                                .0
                        }
                    };
                }
            };
            // This poller holds the stream's only entry: it either lists it again or clears
            // the flag, under the stream's lock, so the next push lists it anew.
            let Some(stream) = entry.upgrade() else {
                continue;
            };
            let mut st = stream.lock();
            let event = if st.gone { None } else { st.events.pop_front() };
            let Some(event) = event else {
                st.listed = false;
                continue;
            };
            if matches!(event, Event::Finished { .. }) {
                st.gone = true;
                st.listed = false;
                drop(st);
                stream.ready.notify_all();
                self.forget(stream.id, &stream);
            } else if st.events.is_empty() {
                st.listed = false;
            } else {
                drop(st);
                self.any.push(entry);
            }
            return Ok(Some(event));
        }
    }

    /// Gives up request `id`: its queued and future events are dropped and the id becomes
    /// unknown. Returns whether the request was still open (then it must be cancelled).
    pub(crate) fn release(&self, id: RequestId) -> Result<bool> {
        let stream = self
            .lock()
            .streams
            .remove(&id)
            .ok_or(Error::UnknownRequest(id))?;
        let mut st = stream.lock();
        if st.gone {
            // Another poller took the terminal event a moment ago: the request has ended and
            // been delivered, so it is no longer there to release.
            return Err(Error::UnknownRequest(id));
        }
        let open = !st.closed;
        st.gone = true;
        st.events = VecDeque::new();
        drop(st);
        stream.ready.notify_all();
        Ok(open)
    }

    fn forget(&self, id: RequestId, stream: &Arc<Stream>) {
        let mut reg = self.lock();
        if reg.streams.get(&id).is_some_and(|s| Arc::ptr_eq(s, stream)) {
            reg.streams.remove(&id);
        }
    }

    /// The engine thread is exiting: refuse new requests and end every open stream with a
    /// terminal event (`reason`, `message`), so every request still ends exactly once.
    pub(crate) fn close_all(&self, reason: FinishReason, message: Option<&str>) {
        let open: Vec<(RequestId, Arc<Stream>)> = {
            let mut reg = self.lock();
            reg.stopped = true;
            reg.streams.iter().map(|(&id, s)| (id, s.clone())).collect()
        };
        for (id, stream) in open {
            stream.push(Event::Finished {
                id,
                reason,
                text: String::new(),
                stats: RequestStats::default(),
                error: message.map(str::to_owned),
            });
        }
        // Wakes every `poll_any` waiter: once the last events are taken, they return.
        self.any.lock().stopped = true;
        self.any.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn token(id: RequestId) -> Event {
        Event::Token {
            id,
            token: 1,
            text: "a".into(),
            logprobs: None,
        }
    }

    fn finished(id: RequestId) -> Event {
        Event::Finished {
            id,
            reason: FinishReason::Length,
            text: String::new(),
            stats: RequestStats::default(),
            error: None,
        }
    }

    fn register(s: &Streams, id: RequestId) -> Arc<Stream> {
        let mut out = None;
        s.register::<()>(id, |st| {
            out = Some(st);
            Ok(())
        })
        .ok()
        .expect("registered");
        out.unwrap()
    }

    #[test]
    fn many_pollers_one_terminal_event() {
        for round in 0..50 {
            let streams = Arc::new(Streams::new(16));
            let stream = register(&streams, 1);
            let finishes = Arc::new(AtomicUsize::new(0));
            let tokens = Arc::new(AtomicUsize::new(0));
            let pollers: Vec<_> = (0..4)
                .map(|_| {
                    let (streams, finishes, tokens) =
                        (streams.clone(), finishes.clone(), tokens.clone());
                    std::thread::spawn(move || loop {
                        match streams.poll(1, Some(Duration::from_millis(5))) {
                            Ok(Some(Event::Finished { .. })) => {
                                finishes.fetch_add(1, Ordering::SeqCst);
                            }
                            Ok(Some(Event::Token { .. })) => {
                                tokens.fetch_add(1, Ordering::SeqCst);
                            }
                            Ok(None) => {}
                            Err(Error::UnknownRequest(1)) => return,
                            Err(e) => panic!("{e}"),
                        }
                    })
                })
                .collect();
            for _ in 0..round {
                stream.push(token(1));
            }
            assert!(stream.push(finished(1)));
            assert!(
                !stream.push(finished(1)),
                "a second terminal event is dropped"
            );
            for p in pollers {
                p.join().unwrap();
            }
            assert_eq!(finishes.load(Ordering::SeqCst), 1);
            assert_eq!(tokens.load(Ordering::SeqCst), round);
            assert_eq!(streams.len(), 0);
        }
    }

    #[test]
    fn release_drops_events_and_wakes_pollers() {
        let streams = Arc::new(Streams::new(2));
        let stream = register(&streams, 7);
        stream.push(token(7));
        let s2 = streams.clone();
        let waiter = std::thread::spawn(move || {
            // Takes the queued token, then waits until the release wakes it.
            let first = s2.poll(7, None).unwrap();
            assert!(matches!(first, Some(Event::Token { .. })));
            s2.poll(7, None)
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(streams.release(7).unwrap(), "still open");
        assert!(matches!(
            waiter.join().unwrap(),
            Err(Error::UnknownRequest(7))
        ));
        stream.push(token(7));
        assert_eq!(stream.queued(), 0, "nothing is queued after release");
        assert!(matches!(streams.release(7), Err(Error::UnknownRequest(7))));
        assert_eq!(streams.len(), 0);
    }

    /// Per-id pollers and `poll_any` pollers on the same requests, racing: every event is
    /// delivered once, every request ends once, and one request's events keep their order
    /// for a single `poll_any` consumer.
    #[test]
    fn poll_any_and_per_id_polls_share_exactly_once() {
        for round in 0..20u64 {
            let streams = Arc::new(Streams::new(64));
            let n = 16u64;
            let handles: Vec<_> = (1..=n).map(|id| register(&streams, id)).collect();
            let finishes = Arc::new(AtomicUsize::new(0));
            let tokens = Arc::new(AtomicUsize::new(0));
            let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let mut pollers = Vec::new();
            for p in 0..4u64 {
                let (streams, finishes, tokens, done) = (
                    streams.clone(),
                    finishes.clone(),
                    tokens.clone(),
                    done.clone(),
                );
                pollers.push(std::thread::spawn(move || {
                    while !done.load(Ordering::SeqCst) {
                        let got = if p % 2 == 0 {
                            streams.poll_any(Some(Duration::from_millis(2)))
                        } else {
                            let id = 1 + (p + round) % n;
                            match streams.poll(id, Some(Duration::from_millis(2))) {
                                Err(Error::UnknownRequest(_)) => Ok(None),
                                other => other,
                            }
                        };
                        match got.unwrap() {
                            Some(Event::Finished { .. }) => {
                                finishes.fetch_add(1, Ordering::SeqCst);
                            }
                            Some(Event::Token { .. }) => {
                                tokens.fetch_add(1, Ordering::SeqCst);
                            }
                            None => {}
                        }
                    }
                }));
            }
            for (i, s) in handles.iter().enumerate() {
                for _ in 0..(i as u64 + round) % 5 {
                    s.push(token(s.id));
                }
                s.push(finished(s.id));
            }
            let start = Instant::now();
            while finishes.load(Ordering::SeqCst) < n as usize {
                assert!(start.elapsed() < Duration::from_secs(10), "events lost");
                std::thread::sleep(Duration::from_millis(1));
            }
            done.store(true, Ordering::SeqCst);
            for p in pollers {
                p.join().unwrap();
            }
            let want: u64 = (0..n).map(|i| (i + round) % 5).sum();
            assert_eq!(finishes.load(Ordering::SeqCst), n as usize);
            assert_eq!(tokens.load(Ordering::SeqCst), want as usize);
            assert_eq!(streams.len(), 0);
        }
    }

    #[test]
    fn poll_any_keeps_order_and_takes_turns() {
        let streams = Streams::new(8);
        let a = register(&streams, 1);
        let b = register(&streams, 2);
        for _ in 0..3 {
            a.push(token(1));
        }
        b.push(token(2));
        a.push(finished(1));
        b.push(finished(2));
        let ids: Vec<RequestId> = std::iter::from_fn(|| {
            streams
                .poll_any(Some(Duration::ZERO))
                .unwrap()
                .map(|e| e.request_id())
        })
        .collect();
        // Round robin: a, b, a, b(finished), a, a(finished).
        assert_eq!(ids, [1, 2, 1, 2, 1, 1]);
        assert_eq!(streams.len(), 0);
        assert!(streams.poll_any(Some(Duration::ZERO)).unwrap().is_none());
    }

    /// After the engine thread's final sweep, `poll_any` hands out what is left and then
    /// answers `ShutDown` at once instead of waiting out its timeout; a waiting caller wakes.
    #[test]
    fn poll_any_ends_after_shutdown() {
        let streams = Arc::new(Streams::new(4));
        let a = register(&streams, 1);
        a.push(token(1));
        let s2 = streams.clone();
        let waiter = std::thread::spawn(move || {
            let mut got = Vec::new();
            loop {
                match s2.poll_any(Some(Duration::from_secs(600))) {
                    Ok(Some(e)) => got.push(e),
                    Ok(None) => panic!("timed out"),
                    Err(e) => return (got, e),
                }
            }
        });
        std::thread::sleep(Duration::from_millis(50));
        let start = Instant::now();
        streams.close_all(FinishReason::Cancelled, None);
        let (got, end) = waiter.join().unwrap();
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(matches!(end, Error::ShutDown));
        assert_eq!(got.len(), 2);
        assert!(matches!(got[1], Event::Finished { .. }));
        assert!(matches!(
            streams.poll_any(Some(Duration::from_secs(600))),
            Err(Error::ShutDown)
        ));
    }

    /// A host that never calls `poll_any` does not grow the ready queue without bound.
    #[test]
    fn ready_queue_stays_bounded_without_poll_any() {
        let streams = Streams::new(4);
        for id in 1..=10_000u64 {
            let s = register(&streams, id);
            s.push(token(id));
            s.push(finished(id));
            while streams.poll(id, Some(Duration::ZERO)).is_ok() {}
        }
        assert!(streams.any.lock().entries.len() <= SWEEP_MIN);
        assert_eq!(streams.len(), 0);
    }

    #[test]
    fn full_registry_refuses_and_close_all_ends_everything() {
        let streams = Streams::new(2);
        let a = register(&streams, 1);
        register(&streams, 2);
        assert!(matches!(
            streams.register::<()>(3, |_| Ok(())),
            Err(Ok(Refused::Full(2)))
        ));
        a.push(finished(1));
        streams.close_all(FinishReason::Cancelled, None);
        assert!(matches!(
            streams.register::<()>(4, |_| Ok(())),
            Err(Ok(Refused::Stopped))
        ));
        for id in [1, 2] {
            let e = streams.poll(id, Some(Duration::ZERO)).unwrap().unwrap();
            assert!(matches!(e, Event::Finished { .. }));
            assert!(streams.poll(id, Some(Duration::ZERO)).is_err());
        }
        // Request 1 kept its own terminal event (Length), not the sweep's.
        assert_eq!(streams.len(), 0);
    }
}
