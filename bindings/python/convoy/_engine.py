"""The engine, its requests (sync and asyncio), and the event dispatcher."""

from __future__ import annotations

import asyncio
import atexit
import ctypes
import os
import queue
import threading
import warnings
import weakref
from ctypes import byref, c_size_t, c_uint32, c_uint64, c_void_p, sizeof
from typing import (
    Any,
    AsyncIterator,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
)

from . import _lib
from ._errors import (
    InvalidArgumentError,
    InvalidUtf8Error,
    RequestError,
    ShutDownError,
    Status,
    error_for,
)
from ._lib import (
    EVENT_KIND_FINISHED,
    EVENT_KIND_TOKEN,
    LOG_CALLBACK,
    BatchRequestStruct,
    ChatMessageStruct,
    EngineConfig,
    EngineStatsStruct,
    EventStruct,
    Library,
    ModelInfoStruct,
    RequestParams,
    RequestStatsStruct,
    has_field,
)
from ._types import (
    FINISH_REASONS,
    BatchMode,
    Completion,
    EngineStats,
    FinishReason,
    ModelInfo,
    RequestStats,
    Result,
    Token,
    Weights,
)

#: How long one blocking C poll waits (ms). Bounds how late Ctrl-C, close() and the
#: dispatcher's stop are noticed; events themselves are delivered as soon as they exist.
POLL_TIMEOUT_MS = 100
#: How long close() waits for C calls in flight on other threads.
_CLOSE_WAIT_S = 30.0

_U32_MAX = 2**32 - 1
_U64_MAX = 2**64 - 1

Message = Union[Mapping[str, str], Tuple[str, str], Any]


# ---------------------------------------------------------------------------------------
# Argument conversion


def _invalid(message: str) -> InvalidArgumentError:
    return InvalidArgumentError(Status.INVALID_ARGUMENT, message)


def _encode(text: Any, what: str) -> bytes:
    """UTF-8 bytes of ``text`` for a NUL-terminated C string."""
    if not isinstance(text, str):
        raise _invalid(f"{what} must be a str, not {type(text).__name__}")
    if "\0" in text:
        raise _invalid(f"{what} contains a NUL character")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidUtf8Error(Status.INVALID_UTF8, f"{what} is not valid UTF-8: {e}") from None


def _uint(value: Any, what: str, maximum: int = _U32_MAX) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            value = int(value.__index__())
        except (AttributeError, TypeError):
            raise _invalid(f"{what} must be an int, not {type(value).__name__}") from None
    if not 0 <= value <= maximum:
        raise _invalid(f"{what}={value} is out of range (0..={maximum})")
    return value


def _path_bytes(path: Any, what: str) -> bytes:
    """The file system bytes of ``path`` (a str or os.PathLike) for a C string."""
    try:
        data = os.fsencode(os.fspath(path))
    except TypeError:
        raise _invalid(f"{what} must be a str or os.PathLike, not {type(path).__name__}") from None
    if b"\0" in data:
        raise _invalid(f"{what} contains a NUL character")
    return data


def _float(value: Any, what: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise _invalid(f"{what} must be a number, not {value!r}") from None


def _u32_array(values: Iterable[Any], what: str) -> "ctypes.Array[c_uint32]":
    ids = [_uint(v, what) for v in values]
    return (c_uint32 * len(ids))(*ids)


def _enum(value: Any, enum_type: Any, what: str) -> int:
    if isinstance(value, str):
        try:
            return int(enum_type[value.upper()])
        except KeyError:
            names = ", ".join(m.name.lower() for m in enum_type)
            raise _invalid(f"{what}={value!r}: expected one of {names}") from None
    return _uint(value, what)


def _messages(lib: Library, messages: Any) -> Tuple[Any, int, List[bytes]]:
    """A ``convoy_chat_message`` array for ``messages`` (each a mapping with "role" and
    "content", an object with ``.role`` and ``.content``, or a (role, content) pair), its
    length, and the bytes objects it points to (keep them alive during the call)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Iterable):
        raise _invalid("messages must be a list of {'role': ..., 'content': ...}")
    pairs = []
    for i, m in enumerate(messages):
        if isinstance(m, Mapping):
            try:
                role, content = m["role"], m["content"]
            except KeyError as e:
                raise _invalid(f"messages[{i}] lacks {e.args[0]!r}") from None
        elif isinstance(m, (tuple, list)) and len(m) == 2:
            role, content = m
        elif hasattr(m, "role") and hasattr(m, "content"):
            role, content = m.role, m.content
        else:
            raise _invalid(f"messages[{i}] is not a {{'role', 'content'}} mapping")
        pairs.append((_encode(role, f"messages[{i}]['role']"), _encode(content, f"messages[{i}]['content']")))
    array = (ChatMessageStruct * len(pairs))()
    keep: List[bytes] = []
    for i, (role, content) in enumerate(pairs):
        lib.check(lib.chat_message_init(byref(array[i]), sizeof(ChatMessageStruct), role, content))
        keep += [role, content]
    return array, len(pairs), keep


def _params(
    lib: Library,
    max_tokens: Optional[int] = None,
    temperature: Optional[float] = None,
    top_p: Optional[float] = None,
    top_k: Optional[int] = None,
    min_p: Optional[float] = None,
    repetition_penalty: Optional[float] = None,
    presence_penalty: Optional[float] = None,
    frequency_penalty: Optional[float] = None,
    seed: Optional[int] = None,
    stop: Union[None, str, Sequence[str]] = None,
    stop_token_ids: Optional[Sequence[int]] = None,
    ignore_eos: bool = False,
) -> Tuple[RequestParams, List[Any]]:
    """A ``convoy_request_params`` (library defaults for every None) and the buffers it
    points to."""
    p = RequestParams()
    lib.check(lib.request_params_init(byref(p), sizeof(p)))
    keep: List[Any] = []
    if max_tokens is not None:
        p.max_tokens = _uint(max_tokens, "max_tokens")
    if temperature is not None:
        p.temperature = _float(temperature, "temperature")
    if top_p is not None:
        p.top_p = _float(top_p, "top_p")
    if top_k is not None:
        p.top_k = _uint(top_k, "top_k")
    if min_p is not None:
        p.min_p = _float(min_p, "min_p")
    if repetition_penalty is not None:
        p.repetition_penalty = _float(repetition_penalty, "repetition_penalty")
    if presence_penalty is not None:
        p.presence_penalty = _float(presence_penalty, "presence_penalty")
    if frequency_penalty is not None:
        p.frequency_penalty = _float(frequency_penalty, "frequency_penalty")
    if seed is not None:
        p.has_seed = True
        p.seed = _uint(seed, "seed", _U64_MAX)
    p.ignore_eos = bool(ignore_eos)
    if stop:
        if isinstance(stop, str):
            stop = [stop]
        strings = [_encode(s, "stop string") for s in stop]
        array = (ctypes.c_char_p * len(strings))(*strings)
        keep += [strings, array]
        p.stop_strings = ctypes.cast(array, ctypes.POINTER(ctypes.c_char_p))
        p.n_stop_strings = len(strings)
    if stop_token_ids:
        ids = _u32_array(stop_token_ids, "stop_token_ids")
        keep.append(ids)
        p.stop_token_ids = ctypes.cast(ids, ctypes.POINTER(c_uint32))
        p.n_stop_token_ids = len(ids)
    return p, keep


# ---------------------------------------------------------------------------------------
# Events and routing


class _Item:
    """An event copied out of convoy's thread-local storage."""

    __slots__ = ("kind", "request_id", "token", "text", "reason", "stats", "error")

    def __init__(self, ev: EventStruct) -> None:
        self.kind = ev.kind
        self.request_id = ev.request_id
        self.token = ev.token
        self.text = (
            ctypes.string_at(ev.text, ev.text_len).decode("utf-8", "replace")
            if ev.text and ev.text_len
            else ""
        )
        self.reason: Any = FinishReason.NONE
        self.stats: Optional[RequestStats] = None
        self.error = ""
        if self.kind == EVENT_KIND_FINISHED:
            self.reason = FINISH_REASONS.get(ev.finish_reason, ev.finish_reason)
            if ev.stats:
                self.stats = _copy_request_stats(ev.stats)
            if ev.error:
                self.error = ev.error.decode("utf-8", "replace")


# Markers a route receives instead of an event.
_CLOSED = object()  # the engine was closed
_RELEASED = object()  # the request was released
_SWITCH = object()  # (direct polling only) the dispatcher took over


def _copy_request_stats(ptr: Any) -> RequestStats:
    """Copies a library-owned ``convoy_request_stats`` (``struct_size`` is the library's)."""
    size = ctypes.cast(ptr, ctypes.POINTER(c_uint32)).contents.value
    s = RequestStatsStruct()
    n = min(size, sizeof(s))
    ctypes.memmove(byref(s), ptr, n)
    s.struct_size = n
    return RequestStats(
        **{
            name: (getattr(s, name) if has_field(s, name) else None)
            for name in RequestStats.__dataclass_fields__
        }
    )


class _SyncRoute:
    def __init__(self) -> None:
        self.queue: "queue.SimpleQueue[Any]" = queue.SimpleQueue()

    def push(self, item: Any) -> bool:
        self.queue.put(item)
        return True


class _AsyncRoute:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: "asyncio.Queue[Any]" = asyncio.Queue()

    def push(self, item: Any) -> bool:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
            return True
        except RuntimeError:  # the event loop is closed: nobody will read this request
            return False


class _Core:
    """The C engine handle plus the state that keeps every event delivered exactly once.

    Every request has a *route* (a queue) registered under the lock in the same critical
    section as its submission, so an event can never arrive for an id that is not yet
    registered. Events reach a route in one of two ways, never both at once:

    * **Direct** (before any asyncio call on this engine): a sync :class:`Request` polls its
      own id with ``convoy_engine_poll`` (``POLL_TIMEOUT_MS`` at a time, so Ctrl-C works).
    * **Dispatched** (from the first asyncio call until close): one background thread calls
      ``convoy_engine_poll_any`` in a loop and pushes each event into its request's route
      (a ``queue.SimpleQueue`` for sync requests, an ``asyncio.Queue`` filled through
      ``loop.call_soon_threadsafe`` for asyncio ones). Events of unregistered (released)
      ids are dropped.

    The switch is a handoff: starting the dispatcher sets ``dispatching`` (no new direct
    poll starts from then on), and the dispatcher waits until the direct polls in flight
    have returned before its first ``poll_any``. A sync request then reads the rest of its
    events from its route. Because convoy hands each event to exactly one poller in order,
    and at no moment do a direct poll and ``poll_any`` run together, each request sees
    every event once and in order, and its FINISHED event exactly once.

    ``close()`` stops the dispatcher (joins it), waits for the C calls in flight (each
    bounded by ``POLL_TIMEOUT_MS``), then calls ``convoy_engine_destroy``; requests still
    open end with ``FinishReason.CANCELLED``.
    """

    def __init__(self, lib: Library, handle: int, keep: Any) -> None:
        self.lib = lib
        self.handle: Optional[int] = handle
        self.keep = keep  # the log callback's ctypes thunk: alive until destroy
        self.cond = threading.Condition(threading.RLock())
        self.routes: Dict[int, Any] = {}
        self.closed = False
        self.stopping = False
        self.active = 0  # C calls using the handle in flight (other than submit/cancel/release)
        self.direct_polls = 0
        self.dispatching = False
        self.dispatcher: Optional[threading.Thread] = None
        self.destroy_on_exit = False
        self.dispatch_error: Optional[BaseException] = None

    # -- calls --------------------------------------------------------------------------

    def enter(self) -> int:
        with self.cond:
            if self.closed:
                raise ShutDownError(Status.SHUT_DOWN, "the engine is closed")
            self.active += 1
            return self.handle  # type: ignore[return-value]

    def leave(self) -> None:
        with self.cond:
            self.active -= 1
            if self.active == 0:
                self.cond.notify_all()

    def submit(self, call: Callable[[int, Any], int], route: Any) -> int:
        out = c_uint64()
        with self.cond:
            if self.closed:
                raise ShutDownError(Status.SHUT_DOWN, "the engine is closed")
            # Under the lock: the dispatcher cannot route this id's events before the route
            # is registered. Submit never waits for the model.
            self.lib.check(call(self.handle, byref(out)))  # type: ignore[arg-type]
            self.routes[out.value] = route
        return out.value

    def submit_many(self, call: Callable[[int, Any], int], routes: List[Any]) -> List[int]:
        out = (c_uint64 * len(routes))()
        with self.cond:
            if self.closed:
                raise ShutDownError(Status.SHUT_DOWN, "the engine is closed")
            # As submit: every route is registered before the dispatcher can see an event.
            try:
                self.lib.check(call(self.handle, out))  # type: ignore[arg-type]
                for request_id, route in zip(out, routes):
                    self.routes[request_id] = route
            except BaseException:
                # A KeyboardInterrupt can land after the batch was queued (ids start at 1
                # and are written only on success): give those requests up, or nobody would.
                if len(routes) > 0 and out[0] != 0:
                    for request_id in out:
                        self.routes.pop(request_id, None)
                        self.lib.engine_release(self.handle, request_id)
                raise
        return list(out)

    def cancel(self, request_id: int) -> None:
        with self.cond:
            if self.closed:
                return
            status = self.lib.engine_cancel(self.handle, request_id)
            if status not in (Status.OK, Status.UNKNOWN_REQUEST, Status.SHUT_DOWN):
                self.lib.check(status)

    def release(self, request_id: int) -> None:
        with self.cond:
            route = self.routes.pop(request_id, None)
            if not self.closed:
                self.lib.engine_release(self.handle, request_id)  # never blocks
        if route is not None:
            route.push(_RELEASED)

    def direct_poll(self, request_id: int, ev: EventStruct) -> Any:
        """One ``convoy_engine_poll`` of ``request_id``: an :class:`_Item`, None (timeout),
        ``_RELEASED``, ``_CLOSED`` or ``_SWITCH`` (read the route from now on)."""
        counted = False
        try:
            with self.cond:
                if self.closed:
                    return _CLOSED
                if self.dispatching:
                    return _SWITCH
                self.direct_polls += 1
                counted = True
            self.lib.check(self.lib.event_init(byref(ev), sizeof(ev)))
            status = self.lib.engine_poll(self.handle, request_id, POLL_TIMEOUT_MS, byref(ev))
            if status == Status.OK:
                item = _Item(ev)
                if item.kind == EVENT_KIND_FINISHED:
                    with self.cond:
                        self.routes.pop(request_id, None)
                return item
            if status == Status.TIMEOUT:
                return None
            if status == Status.UNKNOWN_REQUEST:
                return _RELEASED
            raise error_for(status, self.lib.last_error())
        finally:
            if counted:
                with self.cond:
                    self.direct_polls -= 1
                    self.cond.notify_all()

    # -- dispatcher -----------------------------------------------------------------------

    def start_dispatcher(self) -> None:
        with self.cond:
            if self.closed:
                raise ShutDownError(Status.SHUT_DOWN, "the engine is closed")
            if self.dispatching:
                return
            self.dispatching = True
            thread = threading.Thread(target=self._dispatch, name="convoy-dispatcher", daemon=True)
            self.dispatcher = thread
            thread.start()

    def _dispatch(self) -> None:
        lib = self.lib
        ev = EventStruct()
        with self.cond:
            self.cond.wait_for(lambda: self.direct_polls == 0 or self.stopping)
        while True:
            with self.cond:
                if self.stopping:
                    break
                self.active += 1
            item = None
            failed = False
            try:
                lib.event_init(byref(ev), sizeof(ev))
                status = lib.engine_poll_any(self.handle, POLL_TIMEOUT_MS, byref(ev))
                if status == Status.OK:
                    item = _Item(ev)
                elif status != Status.TIMEOUT:
                    failed = True
                    self.dispatch_error = error_for(status, lib.last_error())
            except Exception as e:  # never let the thread die: requests would hang
                failed = True
                self.dispatch_error = e
            finally:
                self.leave()
            if item is not None:
                self._route(item)
            elif failed:
                with self.cond:  # do not spin on a persistent failure
                    self.cond.wait(POLL_TIMEOUT_MS / 1000)
        if self.destroy_on_exit:
            self._destroy()

    def _route(self, item: _Item) -> None:
        with self.cond:
            route = self.routes.get(item.request_id)
            if route is not None and item.kind == EVENT_KIND_FINISHED:
                del self.routes[item.request_id]
        if route is not None and not route.push(item):
            self.release(item.request_id)

    # -- closing -------------------------------------------------------------------------

    def close(self) -> None:
        with self.cond:
            if self.closed:
                return
            self.closed = True
            self.stopping = True
            self.cond.notify_all()
            thread = self.dispatcher
        if thread is not None:
            if thread is threading.current_thread():
                # close() from the dispatcher thread itself (a finalizer run there): the
                # dispatcher destroys the engine when its loop ends.
                self.destroy_on_exit = True
                return
            thread.join()
        self._destroy()

    def _destroy(self) -> None:
        with self.cond:
            # Calls in flight return within POLL_TIMEOUT_MS (a poll) or at once (the rest).
            idle = self.cond.wait_for(lambda: self.active == 0 and self.direct_polls == 0, _CLOSE_WAIT_S)
            handle, self.handle = self.handle, None
            routes, self.routes = self.routes, {}
        if handle and idle:
            self.lib.engine_destroy(handle)
        elif handle:
            # Only if an exception (Ctrl-C) struck between a call and its bookkeeping:
            # destroying under a call in flight could crash, so the engine is leaked.
            warnings.warn("convoy: engine not destroyed: a call on it seems still in flight", RuntimeWarning)
        self.keep = None
        for route in routes.values():
            route.push(_CLOSED)


# ---------------------------------------------------------------------------------------
# Requests


class _RequestBase:
    def __init__(self, engine: "Engine", request_id: int, route: Any) -> None:
        self._engine = engine  # keeps the engine open while the request is in use
        self._core = engine._core
        self._route = route
        self.id: int = request_id
        #: How the request ended (None until its last event has been consumed).
        self.result: Optional[Result] = None
        self._tokens: List[int] = []
        self._parts: List[str] = []
        self._error_raised = False

    @property
    def text(self) -> str:
        """The text received so far."""
        return "".join(self._parts)

    @property
    def tokens(self) -> List[int]:
        """The generated token ids received so far."""
        return list(self._tokens)

    @property
    def done(self) -> bool:
        """Whether the request has ended (finished, released, or its engine closed)."""
        return self.result is not None

    def cancel(self) -> None:
        """Asks the request to stop (``convoy_engine_cancel``); iteration goes on until its
        FINISHED event, with ``result.finish_reason == FinishReason.CANCELLED`` unless it
        finished first. Never blocks; harmless after the end."""
        if self.result is None:
            self._core.cancel(self.id)

    def release(self) -> None:
        """Gives the request up (``convoy_engine_release``): stops it if running and drops
        its pending events; iteration ends with ``FinishReason.CANCELLED``. Never blocks;
        harmless after the end. Called automatically when an unfinished request is garbage
        collected, leaves a ``with`` block, or its asyncio task is cancelled."""
        if self.result is None:
            self.result = Result(FinishReason.CANCELLED, None, "released")
            self._core.release(self.id)

    def completion(self) -> Completion:
        """The whole output as a :class:`Completion` (after the request ended)."""
        if self.result is None:
            raise RuntimeError("the request has not finished")
        return Completion(self.text, self.tokens, self.result.finish_reason, self.result.stats, self.id)

    def _apply(self, item: Any) -> Optional[Token]:
        """Consumes one routed item; returns the Token to yield, if any."""
        if item is _CLOSED:
            if self.result is None:
                self.result = Result(FinishReason.CANCELLED, None, "the engine was closed")
            return None
        if item is _RELEASED:
            if self.result is None:
                self.result = Result(FinishReason.CANCELLED, None, "released")
            return None
        if item.kind == EVENT_KIND_TOKEN:
            self._tokens.append(item.token)
            self._parts.append(item.text)
            return Token(item.token, item.text)
        self.result = Result(item.reason, item.stats, item.error)
        if item.text:
            self._parts.append(item.text)
            return Token(None, item.text)
        return None

    def _end(self) -> None:
        """Called when ``result`` is set: raises RequestError once for a failed request."""
        assert self.result is not None
        if self.result.finish_reason == FinishReason.ERROR and not self._error_raised:
            self._error_raised = True
            raise RequestError(self.result.error, self.id, self.completion())

    def __del__(self) -> None:
        try:
            if self.result is None:
                self.release()
        except Exception:
            pass

    def __repr__(self) -> str:
        state = "running" if self.result is None else str(self.result.finish_reason)
        return f"<{type(self).__name__} id={self.id} {state} tokens={len(self._tokens)}>"


class Request(_RequestBase):
    """A streaming request (from :meth:`Engine.stream`): an iterator of :class:`Token`.

    Iteration blocks until the next token (waiting in slices of ``POLL_TIMEOUT_MS``, so
    Ctrl-C interrupts it). When it stops, ``result`` says why (``finish_reason``,
    ``stats``); a request that failed on the engine raises :class:`RequestError` instead.
    Use it as a context manager (``with engine.stream(...) as req:``) to release it if the
    loop is left early. ``text`` and ``tokens`` accumulate what was received. Iterate from
    one thread at a time (a lock enforces it).
    """

    def __init__(self, engine: "Engine", request_id: int, route: _SyncRoute) -> None:
        super().__init__(engine, request_id, route)
        self._direct = True
        self._event = EventStruct()
        self._lock = threading.Lock()

    def __iter__(self) -> Iterator[Token]:
        return self

    def __next__(self) -> Token:
        with self._lock:
            while True:
                if self.result is not None:
                    self._end()
                    raise StopIteration
                token = self._apply_next()
                if token is not None:
                    return token

    def _apply_next(self) -> Optional[Token]:
        if self._direct:
            item = self._core.direct_poll(self.id, self._event)
            if item is _SWITCH:
                self._direct = False
            else:
                return None if item is None else self._apply(item)
        try:
            item = self._route.queue.get(timeout=POLL_TIMEOUT_MS / 1000)
        except queue.Empty:
            return None
        return self._apply(item)

    def wait(self) -> Completion:
        """Consumes the rest of the stream and returns the :class:`Completion`."""
        try:
            for _ in self:
                pass
        except BaseException:
            if self.result is None:
                self.release()
            raise
        return self.completion()

    def __enter__(self) -> "Request":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


class AsyncRequest(_RequestBase):
    """A streaming request for asyncio (from :meth:`Engine.astream`): an async iterator of
    :class:`Token`, fed by the engine's dispatcher thread.

    Cancelling the task that awaits it (or ``aclose()``, leaving ``async with``, or garbage
    collection after ``break``) releases the request. ``cancel()`` instead asks it to stop
    and lets iteration run to its FINISHED event (``FinishReason.CANCELLED``).
    """

    def __aiter__(self) -> AsyncIterator[Token]:
        return self

    async def __anext__(self) -> Token:
        while True:
            if self.result is not None:
                self._end()
                raise StopAsyncIteration
            try:
                item = await self._route.queue.get()
            except BaseException:  # CancelledError (task cancelled), KeyboardInterrupt
                self.release()
                raise
            token = self._apply(item)
            if token is not None:
                return token

    async def wait(self) -> Completion:
        """Consumes the rest of the stream and returns the :class:`Completion`."""
        async for _ in self:
            pass
        return self.completion()

    async def aclose(self) -> None:
        """Releases the request if it has not ended."""
        self.release()

    async def __aenter__(self) -> "AsyncRequest":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.release()


# ---------------------------------------------------------------------------------------
# Engine

_live_engines: "weakref.WeakSet[Engine]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    # Engine threads must stop while Python can still run their callbacks.
    for engine in list(_live_engines):
        try:
            engine.close()
        except Exception:
            pass


class Engine:
    """A model loaded into convoy, with its continuous-batching engine thread.

    ``Engine(model_path, max_batch_size=16)`` loads a ``.gguf`` file or an MLX/Hugging Face
    model folder (blocking, seconds). Keyword arguments set fields of
    ``convoy_engine_config`` (None keeps the library default):

    * ``mode``: ``"continuous"`` (default) or ``"static"`` (or a :class:`BatchMode`)
    * ``weights``: ``"auto"``, ``"dequantize"`` or ``"keep_quantized"`` (:class:`Weights`)
    * ``max_batch_size`` (default 8), ``max_waiting`` (256), ``max_requests`` (1024),
      ``max_context`` (0 = the model's), ``prefill_chunk`` (512), ``max_kv_bytes`` (2 GiB)
    * ``mlx_cache_limit_bytes`` (256 MiB; CPU backend only): MLX's process-wide buffer-cache
      limit is raised to at least this while the engine exists (0 leaves it alone)
    * ``prefix_cache_bytes`` (512 MiB; 0 turns the cache off): most bytes of KV the prefix
      cache keeps for later requests that start with the same tokens (chat turns, shared
      system prompts); least recently used entries are evicted
    * ``prefix_cache_path``: a ``.safetensors`` file written by :meth:`save_prefix_cache`,
      loaded while the engine is created (a missing file starts the cache empty; a file made
      for another model, other weights or another format version raises
      :class:`InvalidArgumentError`)
    * ``log_callback``: called with one log line (str) per finished request, on the engine's
      thread; it must return quickly and must not call this engine.

    All methods are thread-safe. Use it as a context manager (``with`` or ``async with``) or
    call :meth:`close`. Raises :class:`ConvoyError` (for example
    :class:`ModelNotFoundError`) if the model cannot be loaded, :class:`LibraryError` if
    libconvoy cannot be loaded.

    Sync and asyncio requests can be mixed on one engine; see :class:`_Core` for how events
    are delivered exactly once (direct polling until the first asyncio call, then one
    dispatcher thread that serves every request).
    """

    def __init__(
        self,
        model_path: Union[str, "os.PathLike[str]"],
        *,
        mode: Union[None, str, int, BatchMode] = None,
        weights: Union[None, str, int, Weights] = None,
        max_batch_size: Optional[int] = None,
        max_waiting: Optional[int] = None,
        max_requests: Optional[int] = None,
        max_context: Optional[int] = None,
        prefill_chunk: Optional[int] = None,
        max_kv_bytes: Optional[int] = None,
        mlx_cache_limit_bytes: Optional[int] = None,
        prefix_cache_bytes: Optional[int] = None,
        prefix_cache_path: Union[None, str, "os.PathLike[str]"] = None,
        log_callback: Optional[Callable[[str], None]] = None,
    ) -> None:
        self._core: Optional[_Core] = None
        lib = _lib.load()
        self._lib = lib
        self.model_path = os.fspath(model_path)
        path = self.model_path
        path_bytes = os.fsencode(path) if isinstance(path, str) else path
        if b"\0" in path_bytes:
            raise _invalid("model_path contains a NUL character")
        cfg = EngineConfig()
        lib.check(lib.engine_config_init(byref(cfg), sizeof(cfg)))
        if mode is not None:
            cfg.mode = _enum(mode, BatchMode, "mode")
        if weights is not None:
            cfg.weights = _enum(weights, Weights, "weights")
        for name, value in (
            ("max_batch_size", max_batch_size),
            ("max_waiting", max_waiting),
            ("max_requests", max_requests),
            ("max_context", max_context),
            ("prefill_chunk", prefill_chunk),
        ):
            if value is not None:
                setattr(cfg, name, _uint(value, name))
        if max_kv_bytes is not None:
            cfg.max_kv_bytes = _uint(max_kv_bytes, "max_kv_bytes", _U64_MAX)
        if mlx_cache_limit_bytes is not None:
            cfg.mlx_cache_limit_bytes = _uint(
                mlx_cache_limit_bytes, "mlx_cache_limit_bytes", _U64_MAX
            )
        if prefix_cache_bytes is not None:
            cfg.prefix_cache_bytes = _uint(prefix_cache_bytes, "prefix_cache_bytes", _U64_MAX)
        cache_path = None  # the bytes cfg.prefix_cache_path points to: alive until create returns
        if prefix_cache_path is not None:
            cache_path = _path_bytes(prefix_cache_path, "prefix_cache_path")
            cfg.prefix_cache_path = cache_path
        thunk = None
        if log_callback is not None:
            if not callable(log_callback):
                raise _invalid("log_callback must be callable")

            def on_log(_user_data: Any, line: Optional[bytes]) -> None:
                log_callback(line.decode("utf-8", "replace") if line else "")

            thunk = LOG_CALLBACK(on_log)
            cfg.log_callback = thunk
        handle = c_void_p()
        lib.check(lib.engine_create(path_bytes, byref(cfg), byref(handle)))
        del cache_path
        self._core = _Core(lib, handle.value, thunk)  # type: ignore[arg-type]
        self._model_info: Optional[ModelInfo] = None
        _live_engines.add(self)

    # -- lifetime -------------------------------------------------------------------------

    def close(self) -> None:
        """Stops the dispatcher thread (if any), then destroys the engine
        (``convoy_engine_destroy``). Requests still running end with
        ``FinishReason.CANCELLED``. Idempotent; later calls raise :class:`ShutDownError`."""
        core = self._core
        if core is not None:
            core.close()

    async def aclose(self) -> None:
        """:meth:`close` without blocking the event loop (runs it in a worker thread)."""
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    @property
    def closed(self) -> bool:
        return self._core is None or self._core.closed

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    async def __aenter__(self) -> "Engine":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"<convoy.Engine {self.model_path!r}{' closed' if self.closed else ''}>"

    def _c(self) -> Tuple[_Core, Library]:
        if self._core is None:
            raise ShutDownError(Status.SHUT_DOWN, "the engine is closed")
        return self._core, self._lib

    # -- generation -----------------------------------------------------------------------

    def _submit(
        self,
        prompt: Optional[str],
        messages: Optional[Sequence[Message]],
        tokens: Optional[Sequence[int]],
        params: Dict[str, Any],
        route: Any,
    ) -> int:
        core, lib = self._c()
        if sum(x is not None for x in (prompt, messages, tokens)) != 1:
            raise _invalid("give exactly one of prompt, messages= or tokens=")
        p, keep = _params(lib, **{k: v for k, v in params.items() if k not in ("prompt", "messages", "tokens")})
        if prompt is not None:
            text = _encode(prompt, "prompt")

            def call(h: int, out: Any) -> int:
                return lib.engine_submit_text(h, text, byref(p), out)

        elif messages is not None:
            array, n, keep_strings = _messages(lib, messages)  # alive until submit returns

            def call(h: int, out: Any) -> int:
                return lib.engine_submit_chat(h, array, n, byref(p), out)

        else:
            if isinstance(tokens, (str, bytes)):
                raise _invalid("tokens must be a list of token ids")
            ids = _u32_array(tokens, "tokens")  # type: ignore[arg-type]

            def call(h: int, out: Any) -> int:
                return lib.engine_submit_tokens(h, ids, len(ids), byref(p), out)

        return core.submit(call, route)

    def stream(
        self,
        prompt: Optional[str] = None,
        *,
        messages: Optional[Sequence[Message]] = None,
        tokens: Optional[Sequence[int]] = None,
        max_tokens: Optional[int] = None,
        temperature: Optional[float] = None,
        top_p: Optional[float] = None,
        top_k: Optional[int] = None,
        min_p: Optional[float] = None,
        repetition_penalty: Optional[float] = None,
        presence_penalty: Optional[float] = None,
        frequency_penalty: Optional[float] = None,
        seed: Optional[int] = None,
        stop: Union[None, str, Sequence[str]] = None,
        stop_token_ids: Optional[Sequence[int]] = None,
        ignore_eos: bool = False,
    ) -> Request:
        """Submits a request and returns it as a :class:`Request`, an iterator of
        :class:`Token`. Arguments as :meth:`generate`. Raises :class:`ConvoyError` at once
        for a rejected submission (bad parameters, ``BUSY``, ``PROMPT_TOO_LONG``...)."""
        route = _SyncRoute()
        request_id = self._submit(prompt, messages, tokens, _kw(locals()), route)
        return Request(self, request_id, route)

    def stream_batch(
        self,
        prompts: Sequence[str],
        *,
        max_tokens: Optional[int] = None,
        temperature: Optional[float] = None,
        top_p: Optional[float] = None,
        top_k: Optional[int] = None,
        min_p: Optional[float] = None,
        repetition_penalty: Optional[float] = None,
        presence_penalty: Optional[float] = None,
        frequency_penalty: Optional[float] = None,
        seed: Optional[int] = None,
        stop: Union[None, str, Sequence[str]] = None,
        stop_token_ids: Optional[Sequence[int]] = None,
        ignore_eos: bool = False,
    ) -> List[Request]:
        """Submits text prompts as one batch (``convoy_engine_submit_batch``): all are
        queued or none is, and the engine takes them together (they start as one batch as
        far as ``max_batch_size`` and the KV budget allow). Returns one :class:`Request` per
        prompt, in order. Parameters as :meth:`generate`, shared by every prompt.

        Raises :class:`ConvoyError` at once for a rejected batch, with nothing queued:
        ``INVALID_ARGUMENT`` for a bad prompt (in a batch of more than one the message names
        it: ``prompts[i]`` or ``request i of the batch``) or a batch larger than
        ``max_waiting`` or ``max_requests``; ``PROMPT_TOO_LONG`` (the message gives the
        length); ``BUSY`` when the batch does not fit whole now."""
        core, lib = self._c()
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Iterable):
            raise _invalid("prompts must be a list of str")
        texts = [_encode(t, f"prompts[{i}]") for i, t in enumerate(prompts)]
        p, keep = _params(lib, **{k: v for k, v in _kw(locals()).items()})
        batch = (BatchRequestStruct * len(texts))()
        for i, text in enumerate(texts):
            lib.check(lib.batch_request_init(byref(batch[i]), sizeof(BatchRequestStruct)))
            batch[i].text = text
            batch[i].params = ctypes.pointer(p)

        def call(h: int, out: Any) -> int:
            return lib.engine_submit_batch(h, batch, len(texts), out)

        routes = [_SyncRoute() for _ in texts]
        ids = core.submit_many(call, routes)
        del keep  # the parameters' buffers lived until the submission returned
        requests: List[Request] = []
        try:
            for request_id, route in zip(ids, routes):
                requests.append(Request(self, request_id, route))
        except BaseException:
            for request_id in ids[len(requests) :]:
                core.release(request_id)
            raise
        return requests

    def generate_batch(
        self,
        prompts: Sequence[str],
        *,
        max_tokens: Optional[int] = None,
        temperature: Optional[float] = None,
        top_p: Optional[float] = None,
        top_k: Optional[int] = None,
        min_p: Optional[float] = None,
        repetition_penalty: Optional[float] = None,
        presence_penalty: Optional[float] = None,
        frequency_penalty: Optional[float] = None,
        seed: Optional[int] = None,
        stop: Union[None, str, Sequence[str]] = None,
        stop_token_ids: Optional[Sequence[int]] = None,
        ignore_eos: bool = False,
    ) -> List[Completion]:
        """Generates a completion for each prompt, submitted as one batch
        (:meth:`stream_batch`), and waits for all of them. Returns them in order. If one
        request fails (:class:`RequestError`) or the wait is interrupted, the others are
        released and the exception propagates."""
        requests = self.stream_batch(prompts, **_kw(locals()))
        try:
            return [r.wait() for r in requests]
        finally:
            for r in requests:
                r.release()

    def generate(
        self,
        prompt: Optional[str] = None,
        *,
        messages: Optional[Sequence[Message]] = None,
        tokens: Optional[Sequence[int]] = None,
        max_tokens: Optional[int] = None,
        temperature: Optional[float] = None,
        top_p: Optional[float] = None,
        top_k: Optional[int] = None,
        min_p: Optional[float] = None,
        repetition_penalty: Optional[float] = None,
        presence_penalty: Optional[float] = None,
        frequency_penalty: Optional[float] = None,
        seed: Optional[int] = None,
        stop: Union[None, str, Sequence[str]] = None,
        stop_token_ids: Optional[Sequence[int]] = None,
        ignore_eos: bool = False,
    ) -> Completion:
        """Generates a completion and waits for it.

        The prompt is exactly one of: ``prompt`` (text, tokenized as is, BOS added if the
        model wants one), ``messages`` (a chat: ``[{"role": "user", "content": "..."}]``,
        rendered with the model's template and generation prompt) or ``tokens`` (token ids).

        Sampling (None keeps the library default): ``max_tokens`` (256), ``temperature``
        (0 = greedy), ``top_p`` (1 = off), ``top_k`` (0 = off), ``min_p`` (0 = off),
        ``repetition_penalty`` (1 = off), ``presence_penalty`` / ``frequency_penalty``
        (0 = off), ``seed`` (reproducible sampling). Stopping: ``stop`` (strings, not
        included in the output), ``stop_token_ids``, ``ignore_eos``.

        Returns a :class:`Completion`; raises :class:`ConvoyError` if the submission is
        rejected and :class:`RequestError` if the request fails on the engine. Ctrl-C
        releases the request.
        """
        return self.stream(**_kw(locals())).wait()

    def astream(
        self,
        prompt: Optional[str] = None,
        *,
        messages: Optional[Sequence[Message]] = None,
        tokens: Optional[Sequence[int]] = None,
        max_tokens: Optional[int] = None,
        temperature: Optional[float] = None,
        top_p: Optional[float] = None,
        top_k: Optional[int] = None,
        min_p: Optional[float] = None,
        repetition_penalty: Optional[float] = None,
        presence_penalty: Optional[float] = None,
        frequency_penalty: Optional[float] = None,
        seed: Optional[int] = None,
        stop: Union[None, str, Sequence[str]] = None,
        stop_token_ids: Optional[Sequence[int]] = None,
        ignore_eos: bool = False,
    ) -> AsyncRequest:
        """Submits a request and returns an :class:`AsyncRequest`
        (``async for token in engine.astream(...)``). Call it from a coroutine: the
        request's events go to the running event loop. Arguments as :meth:`generate`."""
        core, _ = self._c()
        loop = asyncio.get_running_loop()
        core.start_dispatcher()
        route = _AsyncRoute(loop)
        request_id = self._submit(prompt, messages, tokens, _kw(locals()), route)
        return AsyncRequest(self, request_id, route)

    async def agenerate(
        self,
        prompt: Optional[str] = None,
        *,
        messages: Optional[Sequence[Message]] = None,
        tokens: Optional[Sequence[int]] = None,
        max_tokens: Optional[int] = None,
        temperature: Optional[float] = None,
        top_p: Optional[float] = None,
        top_k: Optional[int] = None,
        min_p: Optional[float] = None,
        repetition_penalty: Optional[float] = None,
        presence_penalty: Optional[float] = None,
        frequency_penalty: Optional[float] = None,
        seed: Optional[int] = None,
        stop: Union[None, str, Sequence[str]] = None,
        stop_token_ids: Optional[Sequence[int]] = None,
        ignore_eos: bool = False,
    ) -> Completion:
        """:meth:`generate` for asyncio. Cancelling the awaiting task releases the request."""
        request = self.astream(**_kw(locals()))
        return await request.wait()

    # -- utilities ------------------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool = True) -> List[int]:
        """The token ids of ``text``, as a text prompt is tokenized (BOS first when
        ``add_special`` and the model wants one)."""
        core, lib = self._c()
        data = _encode(text, "text")
        count = c_size_t()
        handle = core.enter()
        try:
            lib.check(lib.engine_tokenize(handle, data, bool(add_special), None, 0, byref(count)))
            while True:
                capacity = count.value
                buf = (c_uint32 * max(capacity, 1))()
                lib.check(lib.engine_tokenize(handle, data, bool(add_special), buf, capacity, byref(count)))
                if count.value <= capacity:
                    return list(buf[: count.value])
        finally:
            core.leave()

    def _string_call(self, call: Callable[[int, Any, int, Any], int]) -> str:
        """Runs an snprintf-style C function: asks for the length, then fills a buffer."""
        core, lib = self._c()
        length = c_size_t()
        handle = core.enter()
        try:
            lib.check(call(handle, None, 0, byref(length)))
            while True:
                n = length.value
                buf = ctypes.create_string_buffer(n + 1)
                lib.check(call(handle, buf, n + 1, byref(length)))
                if length.value <= n:
                    return buf.raw[: length.value].decode("utf-8", "replace")
        finally:
            core.leave()

    def detokenize(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """The text of token ``ids`` (special tokens left out when ``skip_special``)."""
        _, lib = self._c()
        array = _u32_array(ids, "ids")
        return self._string_call(
            lambda h, buf, n, out: lib.engine_detokenize(h, array, len(array), bool(skip_special), buf, n, out)
        )

    def render_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """``messages`` rendered with the model's chat template (what a ``messages=``
        request tokenizes), followed by the assistant's generation prompt when
        ``add_generation_prompt``. Raises :class:`TemplateError` if the model has none."""
        _, lib = self._c()
        array, count, keep_strings = _messages(lib, messages)  # alive during the calls
        return self._string_call(
            lambda h, buf, n, out: lib.engine_render_chat(h, array, count, bool(add_generation_prompt), buf, n, out)
        )

    @property
    def model_info(self) -> ModelInfo:
        """What the model is (:class:`ModelInfo`; read once, then cached)."""
        if self._model_info is None:
            core, lib = self._c()
            info = ModelInfoStruct()
            lib.check(lib.model_info_init(byref(info), sizeof(info)))
            handle = core.enter()
            try:
                lib.check(lib.engine_model_info(handle, byref(info)))
                values: Dict[str, Any] = {}
                for name in ModelInfo.__dataclass_fields__:
                    if name in ("bos_token_id", "eos_token_ids"):
                        continue
                    if has_field(info, name):
                        value = getattr(info, name)
                        values[name] = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
                if has_field(info, "bos_token_id") and info.has_bos_token:
                    values["bos_token_id"] = info.bos_token_id
                if has_field(info, "n_eos_token_ids") and info.eos_token_ids:
                    values["eos_token_ids"] = tuple(info.eos_token_ids[i] for i in range(info.n_eos_token_ids))
            finally:
                core.leave()
            self._model_info = ModelInfo(**values)
        return self._model_info

    def stats(self) -> EngineStats:
        """A snapshot of the engine's counters (:class:`EngineStats`)."""
        core, lib = self._c()
        s = EngineStatsStruct()
        lib.check(lib.engine_stats_init(byref(s), sizeof(s)))
        handle = core.enter()
        try:
            lib.check(lib.engine_get_stats(handle, byref(s)))
        finally:
            core.leave()
        return EngineStats(
            **{name: (getattr(s, name) if has_field(s, name) else None) for name in EngineStats.__dataclass_fields__}
        )

    def save_prefix_cache(self, path: Union[str, "os.PathLike[str]"]) -> int:
        """Writes the prefix cache (every entry's tokens and KV) to ``path``, a file name
        ending in ``.safetensors``, replacing the file atomically; a later
        ``Engine(..., prefix_cache_path=path)`` starts with it. Returns the number of entries
        written. Blocks about one engine step, plus the write. Raises
        :class:`InvalidArgumentError` for another file name or a file that cannot be
        written."""
        core, lib = self._c()
        data = _path_bytes(path, "path")
        entries = c_uint64()
        handle = core.enter()
        try:
            lib.check(lib.engine_save_prefix_cache(handle, data, byref(entries)))
        finally:
            core.leave()
        return entries.value

    @property
    def context_length(self) -> int:
        """The context length requests are held to (the model's, or ``max_context``)."""
        core, lib = self._c()
        handle = core.enter()
        try:
            return int(lib.engine_context_length(handle))
        finally:
            core.leave()


def _kw(local_vars: Dict[str, Any]) -> Dict[str, Any]:
    """The request keyword arguments among a method's locals()."""
    return {k: v for k, v in local_vars.items() if k in _REQUEST_ARGS}


_REQUEST_ARGS = (
    "prompt",
    "messages",
    "tokens",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
)
