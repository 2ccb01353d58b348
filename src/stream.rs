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
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
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
}

/// One request's queue of events.
#[derive(Default)]
pub(crate) struct Stream {
    state: Mutex<State>,
    ready: Condvar,
}

impl Stream {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues an event (engine thread). Ignored once the stream is closed or released.
    /// Returns false if the stream was already closed (a second terminal event would have
    /// broken exactly-once: it is dropped).
    pub(crate) fn push(&self, event: Event) -> bool {
        let mut st = self.lock();
        if st.closed {
            return false;
        }
        let terminal = matches!(event, Event::Finished { .. });
        st.closed = terminal;
        if !st.gone {
            st.events.push_back(event);
        }
        drop(st);
        self.ready.notify_all();
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

/// The live requests' streams (host side).
pub(crate) struct Streams {
    map: Mutex<Registry>,
    max_requests: usize,
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
        }
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Creates the stream of a new request and, under the same lock, hands it to `send`
    /// (which queues the submit command), so the engine thread's final sweep cannot miss it.
    /// If `send` fails the stream is removed again.
    pub(crate) fn register<E>(
        &self,
        id: RequestId,
        send: impl FnOnce(Arc<Stream>) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), std::result::Result<Refused, E>> {
        let mut reg = self.lock();
        if reg.stopped {
            return Err(Ok(Refused::Stopped));
        }
        if reg.streams.len() >= self.max_requests {
            return Err(Ok(Refused::Full(reg.streams.len())));
        }
        let stream = Arc::new(Stream::default());
        send(stream.clone()).map_err(Err)?;
        reg.streams.insert(id, stream);
        Ok(())
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

    /// Gives up request `id`: its queued and future events are dropped and the id becomes
    /// unknown. Returns whether the request was still open (then it must be cancelled).
    pub(crate) fn release(&self, id: RequestId) -> Result<bool> {
        let stream = self
            .lock()
            .streams
            .remove(&id)
            .ok_or(Error::UnknownRequest(id))?;
        let mut st = stream.lock();
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
