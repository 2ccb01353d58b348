//! Between the engine's blocking event API and the async handlers: one thread takes every
//! event with [`Engine::poll_any`] and routes it to the handler of its request through a
//! channel. Handlers never block a runtime thread on the engine.
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use convoy::{Engine, Error, Event, Request, RequestId};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::metrics::Metrics;

#[derive(Default)]
struct Routes {
    /// Requests whose handler waits for events.
    open: HashMap<RequestId, UnboundedSender<Event>>,
    /// Events that arrived between `submit` returning an id and the handler registering it.
    early: HashMap<RequestId, Vec<Event>>,
    /// The dispatcher has stopped: nothing registered now would ever get an event.
    closed: bool,
}

pub struct Bridge {
    engine: Arc<Engine>,
    metrics: Arc<Metrics>,
    routes: Mutex<Routes>,
    stopping: AtomicBool,
    /// Submits between their `stopping` check and their registration: the dispatcher does
    /// not stop while any is.
    submitting: AtomicUsize,
}

/// A submitted request: its events, and a guard that cancels it if the handler goes away
/// before its terminal event (the client disconnected).
pub struct Submitted {
    pub id: RequestId,
    pub events: UnboundedReceiver<Event>,
    guard: CancelOnDrop,
}

impl Submitted {
    /// The terminal event arrived: nothing left to cancel.
    pub fn finished(&mut self) {
        self.guard.armed = false;
    }
}

struct CancelOnDrop {
    id: RequestId,
    bridge: Arc<Bridge>,
    armed: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.armed {
            self.bridge.metrics.disconnect();
            // Ends it at the next step boundary; its terminal event still reaches the
            // dispatcher (counted there), with no one left to hand it to.
            let _ = self.bridge.engine.cancel(self.id);
        }
    }
}

impl Bridge {
    /// Starts the dispatcher thread.
    pub fn start(engine: Arc<Engine>, metrics: Arc<Metrics>) -> (Arc<Self>, JoinHandle<()>) {
        let bridge = Arc::new(Self {
            engine,
            metrics,
            routes: Mutex::new(Routes::default()),
            stopping: AtomicBool::new(false),
            submitting: AtomicUsize::new(0),
        });
        let b = bridge.clone();
        let thread = std::thread::Builder::new()
            .name("convoy-server-events".into())
            .spawn(move || b.dispatch())
            .expect("spawn the event thread");
        (bridge, thread)
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    fn routes(&self) -> MutexGuard<'_, Routes> {
        self.routes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Submits a request; its events come through the returned receiver, ending with exactly
    /// one `Finished` (or the channel closes if the engine stops without one).
    pub fn submit(self: &Arc<Self>, request: Request) -> Result<Submitted, Error> {
        // Counted before the check, so a dispatcher that saw none in progress after
        // `stopping` was set can stop: every later submit sees `stopping`.
        self.submitting.fetch_add(1, Ordering::SeqCst);
        let result = if self.stopping.load(Ordering::SeqCst) {
            Err(Error::ShutDown)
        } else {
            self.register(request)
        };
        self.submitting.fetch_sub(1, Ordering::SeqCst);
        result
    }

    fn register(self: &Arc<Self>, request: Request) -> Result<Submitted, Error> {
        let id = self.engine.submit(request)?;
        let (tx, rx) = unbounded_channel();
        let mut routes = self.routes();
        if routes.closed {
            // The engine failed under us (its events for this id were dropped with the rest).
            drop(routes);
            let _ = self.engine.cancel(id);
            self.engine.health()?;
            return Err(Error::ShutDown);
        }
        let mut ended = false;
        for event in routes.early.remove(&id).unwrap_or_default() {
            ended |= matches!(event, Event::Finished { .. });
            let _ = tx.send(event);
        }
        if !ended {
            // (Ended already: the receiver holds every event, and the sender is dropped.)
            routes.open.insert(id, tx);
        }
        self.metrics
            .set_in_flight(routes.open.len() + routes.early.len());
        drop(routes);
        if !ended && self.stopping.load(Ordering::SeqCst) {
            // `stop` ran between the check in `submit` and the insert: it did not see this id.
            let _ = self.engine.cancel(id);
        }
        Ok(Submitted {
            id,
            events: rx,
            guard: CancelOnDrop {
                id,
                bridge: self.clone(),
                armed: true,
            },
        })
    }

    /// Whether `stop` was called.
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Refuses new requests and cancels every request in flight (each ends at the engine's
    /// next step boundary and its stream closes normally).
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let ids: Vec<RequestId> = self.routes().open.keys().copied().collect();
        for id in ids {
            let _ = self.engine.cancel(id);
        }
    }

    fn dispatch(&self) {
        loop {
            match self.engine.poll_any(Duration::from_millis(100)) {
                Ok(Some(event)) => self.route(event),
                Ok(None) => {
                    if self.stopping.load(Ordering::SeqCst)
                        && self.submitting.load(Ordering::SeqCst) == 0
                        && self.routes().open.is_empty()
                    {
                        break;
                    }
                }
                Err(Error::ShutDown) | Err(Error::EngineFailed(_)) => break,
                Err(e) => eprintln!("convoy-server: polling the engine failed: {e}"),
            }
        }
        // The engine stopped (or the server did): handlers still waiting see their channel
        // close, and registering now fails.
        let mut routes = self.routes();
        routes.closed = true;
        routes.open.clear();
        routes.early.clear();
        self.metrics.set_in_flight(0);
    }

    fn route(&self, event: Event) {
        let id = event.request_id();
        if let Event::Finished { reason, stats, .. } = &event {
            self.metrics.finished(*reason, stats);
        }
        let last = matches!(event, Event::Finished { .. });
        let mut routes = self.routes();
        match routes.open.get(&id) {
            Some(tx) => {
                // A handler that has gone away drops its receiver: nothing to do.
                let _ = tx.send(event);
                if last {
                    routes.open.remove(&id);
                }
            }
            None => routes.early.entry(id).or_default().push(event),
        }
        self.metrics
            .set_in_flight(routes.open.len() + routes.early.len());
    }
}
