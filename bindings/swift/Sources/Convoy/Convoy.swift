// Swift bindings for convoy (include/convoy.h).
//
//   let engine = try Engine(modelPath: "SmolLM2-135M-Instruct.Q4_1.gguf")
//   for try await token in engine.generate("Once upon a time", params: RequestParams(maxTokens: 32)) {
//       print(token.text, terminator: "")
//   }
//
// One dispatcher thread per engine calls convoy_engine_poll_any and routes each event to its
// request's stream. A stream whose consumer stops (Task cancelled, stream and iterator dropped)
// cancels its request; the request's FINISHED event is still drained by the dispatcher, which
// then forgets the request. Destroying the Engine stops the dispatcher, then the C engine;
// streams still open end with a shutDown error.
import CConvoy
import Dispatch
import Foundation

/// convoy_status values (the header's CONVOY_STATUS_* constants).
public enum Status: UInt32, Sendable {
    case ok = 0  // CONVOY_STATUS_OK
    case timeout = 1  // CONVOY_STATUS_TIMEOUT
    case nullPointer = 2  // CONVOY_STATUS_NULL_POINTER
    case invalidUtf8 = 3  // CONVOY_STATUS_INVALID_UTF8
    case invalidArgument = 4  // CONVOY_STATUS_INVALID_ARGUMENT
    case modelNotFound = 5  // CONVOY_STATUS_MODEL_NOT_FOUND
    case corruptModel = 6  // CONVOY_STATUS_CORRUPT_MODEL
    case unsupportedModel = 7  // CONVOY_STATUS_UNSUPPORTED_MODEL
    case tokenizerError = 8  // CONVOY_STATUS_TOKENIZER_ERROR
    case templateError = 9  // CONVOY_STATUS_TEMPLATE_ERROR
    case busy = 10  // CONVOY_STATUS_BUSY
    case promptTooLong = 11  // CONVOY_STATUS_PROMPT_TOO_LONG
    case unknownRequest = 12  // CONVOY_STATUS_UNKNOWN_REQUEST
    case engineFailed = 13  // CONVOY_STATUS_ENGINE_FAILED
    case shutDown = 14  // CONVOY_STATUS_SHUT_DOWN
    case mlxError = 15  // CONVOY_STATUS_MLX_ERROR
    case panic = 16  // CONVOY_STATUS_PANIC
    case ioError = 17  // CONVOY_STATUS_IO_ERROR
}

/// Why a request ended (the header's CONVOY_FINISH_REASON_* constants).
public enum FinishReason: UInt32, Sendable {
    case unfinished = 0  // CONVOY_FINISH_REASON_NONE
    case length = 1  // CONVOY_FINISH_REASON_LENGTH
    case stop = 2  // CONVOY_FINISH_REASON_STOP
    case cancelled = 3  // CONVOY_FINISH_REASON_CANCELLED
    case error = 4  // CONVOY_FINISH_REASON_ERROR
}

private let eventKindFinished: UInt32 = 2  // CONVOY_EVENT_KIND_FINISHED

/// A failed convoy call: the raw convoy_status and convoy_last_error_message().
public struct ConvoyError: Error, CustomStringConvertible, Sendable {
    public let code: UInt32
    public let message: String
    /// nil for a status this version of the bindings does not know.
    public var status: Status? { Status(rawValue: code) }
    public var description: String { "convoy: \(message) (status \(code))" }

    init(_ status: Status, _ message: String) {
        self.code = status.rawValue
        self.message = message
    }

    /// The error of a failed call, with this thread's last error message.
    init(code: UInt32) {
        let length = convoy_last_error_message(nil, 0)
        var buffer = [CChar](repeating: 0, count: length + 1)
        _ = convoy_last_error_message(&buffer, buffer.count)
        let message = buffer.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
        self.code = code
        self.message = message.isEmpty ? String(cString: convoy_status_str(code)) : message
    }
}

private func check(_ status: UInt32) throws {
    if status != Status.ok.rawValue { throw ConvoyError(code: status) }
}

/// One element of a generation stream.
public struct Token: Sendable {
    /// The generated token id; nil for the last element.
    public let id: UInt32?
    /// UTF-8 text this element adds to the output (may be empty).
    public let text: String
    /// Set on the last element only (an ERROR finish throws instead).
    public let finishReason: FinishReason?
}

public struct ChatMessage: Sendable {
    public var role: String  // "system", "user" or "assistant"
    public var content: String
    public init(role: String, content: String) {
        self.role = role
        self.content = content
    }
}

/// Engine configuration; nil fields keep the library's defaults.
public struct EngineConfig: Sendable {
    public var maxBatchSize: UInt32?
    public var maxWaiting: UInt32?
    public var maxRequests: UInt32?
    public var maxContext: UInt32?
    public var prefillChunk: UInt32?
    public var maxKVBytes: UInt64?
    /// Bytes of KV the prefix cache keeps for reuse by later requests (default 512 MiB, 0 off).
    public var prefixCacheBytes: UInt64?
    /// A `.safetensors` file written by `Engine.savePrefixCache(to:)`, loaded when the engine
    /// starts, so a relaunch starts warm (a missing file starts empty; one made for another
    /// model is refused with INVALID_ARGUMENT).
    public var prefixCachePath: String?

    public init(maxBatchSize: UInt32? = nil, maxWaiting: UInt32? = nil, maxRequests: UInt32? = nil,
                maxContext: UInt32? = nil, prefillChunk: UInt32? = nil, maxKVBytes: UInt64? = nil,
                prefixCacheBytes: UInt64? = nil, prefixCachePath: String? = nil) {
        self.maxBatchSize = maxBatchSize
        self.maxWaiting = maxWaiting
        self.maxRequests = maxRequests
        self.maxContext = maxContext
        self.prefillChunk = prefillChunk
        self.maxKVBytes = maxKVBytes
        self.prefixCacheBytes = prefixCacheBytes
        self.prefixCachePath = prefixCachePath
    }

    func cConfig() throws -> convoy_engine_config {
        var c = convoy_engine_config()
        // stride, not size: C's sizeof includes tail padding.
        try check(convoy_engine_config_init(&c, MemoryLayout<convoy_engine_config>.stride))
        if let v = maxBatchSize { c.max_batch_size = v }
        if let v = maxWaiting { c.max_waiting = v }
        if let v = maxRequests { c.max_requests = v }
        if let v = maxContext { c.max_context = v }
        if let v = prefillChunk { c.prefill_chunk = v }
        if let v = maxKVBytes { c.max_kv_bytes = v }
        if let v = prefixCacheBytes { c.prefix_cache_bytes = v }
        return c
    }
}

/// Sampling and stopping parameters; nil fields keep the library's defaults (greedy, 256 tokens).
public struct RequestParams: Sendable {
    public var maxTokens: UInt32?
    public var temperature: Float?
    public var topK: UInt32?
    public var topP: Float?
    public var minP: Float?
    public var repetitionPenalty: Float?
    public var seed: UInt64?
    public var ignoreEOS = false
    public var stopTokenIDs: [UInt32] = []
    public var stopStrings: [String] = []

    public init(maxTokens: UInt32? = nil, temperature: Float? = nil, seed: UInt64? = nil,
                stopStrings: [String] = []) {
        self.maxTokens = maxTokens
        self.temperature = temperature
        self.seed = seed
        self.stopStrings = stopStrings
    }

    /// Calls `body` with the C struct; its pointers are valid during the call only.
    func withCParams<R>(_ body: (UnsafePointer<convoy_request_params>) -> R) -> R {
        var p = convoy_request_params()
        _ = convoy_request_params_init(&p, MemoryLayout<convoy_request_params>.stride)
        if let v = maxTokens { p.max_tokens = v }
        if let v = temperature { p.temperature = v }
        if let v = topK { p.top_k = v }
        if let v = topP { p.top_p = v }
        if let v = minP { p.min_p = v }
        if let v = repetitionPenalty { p.repetition_penalty = v }
        if let v = seed {
            p.has_seed = true
            p.seed = v
        }
        p.ignore_eos = ignoreEOS
        return withCStrings(stopStrings) { strings -> R in
            strings.withUnsafeBufferPointer { stops -> R in
                stopTokenIDs.withUnsafeBufferPointer { ids -> R in
                    p.stop_strings = stops.baseAddress
                    p.n_stop_strings = stops.count
                    p.stop_token_ids = ids.baseAddress
                    p.n_stop_token_ids = ids.count
                    return body(&p)
                }
            }
        }
    }
}

/// Calls `body` with C copies of `strings` (freed afterwards).
private func withCStrings<R>(_ strings: [String], _ body: ([UnsafePointer<CChar>?]) -> R) -> R {
    let copies = strings.map { strdup($0) }
    defer { copies.forEach { free($0) } }
    return body(copies.map { UnsafePointer($0) })
}

public struct EngineStats: Sendable {
    public let running: UInt32
    public let waiting: UInt32
    /// Requests queued, running, or ended with events not yet polled.
    public let requestsHeld: UInt64
    public let requestsFinished: UInt64
    public let tokensGenerated: UInt64
    /// Requests that reused a cached prefix, and the prompt tokens they did not compute.
    public let prefixCacheHits: UInt64
    public let prefixCacheHitTokens: UInt64
}

public final class Engine: @unchecked Sendable {
    private let dispatcher: Dispatcher

    /// Loads the model (blocks for seconds) and starts the engine and its dispatcher thread.
    public init(modelPath: String, config: EngineConfig = EngineConfig()) throws {
        var c = try config.cConfig()
        var handle: OpaquePointer?
        if let path = config.prefixCachePath {
            // The path is read during convoy_engine_create only.
            try path.withCString { p in
                c.prefix_cache_path = p
                try check(convoy_engine_create(modelPath, &c, &handle))
            }
        } else {
            try check(convoy_engine_create(modelPath, &c, &handle))
        }
        dispatcher = Dispatcher(handle!)
        let thread = Thread { [dispatcher] in dispatcher.run() }
        thread.name = "convoy-dispatcher"
        thread.start()
    }

    deinit {
        dispatcher.shutdown()
    }

    /// Streams the generation for a text prompt. Submission errors (BUSY, PROMPT_TOO_LONG, ...)
    /// and a request that fails end the stream with a ConvoyError.
    public func generate(_ prompt: String, params: RequestParams = RequestParams())
        -> AsyncThrowingStream<Token, Error>
    {
        AsyncThrowingStream { continuation in
            dispatcher.submit(params, continuation) { engine, p, id in
                convoy_engine_submit_text(engine, prompt, p, id)
            }
        }
    }

    /// Streams the assistant's answer to a chat (rendered with the model's chat template).
    public func generate(chat messages: [ChatMessage], params: RequestParams = RequestParams())
        -> AsyncThrowingStream<Token, Error>
    {
        AsyncThrowingStream { continuation in
            dispatcher.submit(params, continuation) { engine, p, id in
                withCStrings(messages.flatMap { [$0.role, $0.content] }) { strings -> UInt32 in
                    var cMessages = [convoy_chat_message](repeating: convoy_chat_message(), count: messages.count)
                    for i in cMessages.indices {
                        _ = convoy_chat_message_init(&cMessages[i], MemoryLayout<convoy_chat_message>.stride,
                                                     strings[2 * i], strings[2 * i + 1])
                    }
                    return convoy_engine_submit_chat(engine, cMessages, cMessages.count, p, id)
                }
            }
        }
    }

    /// Collects a whole generation's text.
    public func complete(_ prompt: String, params: RequestParams = RequestParams()) async throws -> String {
        var text = ""
        for try await token in generate(prompt, params: params) { text += token.text }
        return text
    }

    public func stats() throws -> EngineStats {
        try dispatcher.stats()
    }

    /// Writes the prefix cache to `path` (a `.safetensors` file, replaced atomically); returns
    /// how many entries it holds. Blocks until the engine has written it between two steps.
    public func savePrefixCache(to path: String) throws -> UInt64 {
        try dispatcher.savePrefixCache(path)
    }
}

/// Owns the C engine and the routing table; shared by the Engine, its dispatcher thread and
/// the streams' termination handlers (which may outlive the Engine).
private final class Dispatcher: @unchecked Sendable {
    typealias Continuation = AsyncThrowingStream<Token, Error>.Continuation

    private let handle: OpaquePointer
    private let lock = NSLock()
    private var routes: [UInt64: Continuation] = [:]  // requests whose FINISHED is not yet polled
    private var closed = false  // set by shutdown() or when polling failed
    private var failure: ConvoyError?
    private let exited = DispatchSemaphore(value: 0)

    init(_ handle: OpaquePointer) {
        self.handle = handle
    }

    /// Submits under the lock, so the dispatcher cannot see the request's events before its
    /// continuation is registered (submit never waits for the model).
    func submit(_ params: RequestParams, _ continuation: Continuation,
                _ call: (OpaquePointer, UnsafePointer<convoy_request_params>, UnsafeMutablePointer<UInt64>) -> UInt32)
    {
        lock.lock()
        if closed {
            let error = failure ?? ConvoyError(.shutDown, "the engine was destroyed")
            lock.unlock()
            continuation.finish(throwing: error)
            return
        }
        var id: UInt64 = 0
        let status = params.withCParams { p in call(handle, p, &id) }
        if status != Status.ok.rawValue {
            let error = ConvoyError(code: status)  // same thread: the message is this call's
            lock.unlock()
            continuation.finish(throwing: error)
            return
        }
        // No consumer exists yet (we are inside the stream's build closure) and the dispatcher
        // waits for the lock, so nothing can end the stream before this handler is set.
        continuation.onTermination = { [self, id] termination in
            if case .cancelled = termination { cancel(id) }
        }
        routes[id] = continuation
        lock.unlock()
    }

    /// The consumer stopped: ask the engine to stop; the FINISHED event is drained by run().
    private func cancel(_ id: UInt64) {
        lock.lock()
        defer { lock.unlock() }
        if !closed { _ = convoy_engine_cancel(handle, id) }  // UNKNOWN_REQUEST if it just ended
    }

    func stats() throws -> EngineStats {
        var s = convoy_engine_stats()
        try check(convoy_engine_stats_init(&s, MemoryLayout<convoy_engine_stats>.stride))
        try check(convoy_engine_get_stats(handle, &s))
        return EngineStats(running: s.running, waiting: s.waiting, requestsHeld: s.requests_held,
                           requestsFinished: s.requests_finished, tokensGenerated: s.tokens_generated,
                           prefixCacheHits: s.prefix_cache_hits,
                           prefixCacheHitTokens: s.prefix_cache_hit_tokens)
    }

    func savePrefixCache(_ path: String) throws -> UInt64 {
        var entries: UInt64 = 0
        try check(convoy_engine_save_prefix_cache(handle, path, &entries))
        return entries
    }

    /// The dispatcher thread: polls every request's events and routes them.
    func run() {
        defer { exited.signal() }
        var event = convoy_event()
        while true {
            lock.lock()
            let stop = closed
            lock.unlock()
            if stop { return }
            _ = convoy_event_init(&event, MemoryLayout<convoy_event>.stride)
            let status = convoy_engine_poll_any(handle, 50, &event)
            if status == Status.timeout.rawValue { continue }
            if status != Status.ok.rawValue {
                fail(ConvoyError(code: status))
                return
            }
            route(event)
        }
    }

    /// Copies the event's strings (valid until this thread's next poll) and routes it.
    private func route(_ event: convoy_event) {
        let text = event.text.map {
            String(decoding: UnsafeRawBufferPointer(start: $0, count: event.text_len), as: UTF8.self)
        } ?? ""
        let finished = event.kind == eventKindFinished
        lock.lock()
        // A request's FINISHED event comes exactly once: forget the request then.
        let continuation = finished ? routes.removeValue(forKey: event.request_id) : routes[event.request_id]
        lock.unlock()
        guard let continuation else { return }
        if !finished {
            continuation.yield(Token(id: event.token, text: text, finishReason: nil))
            return
        }
        let reason = FinishReason(rawValue: event.finish_reason) ?? .error
        if reason == .error {
            let message = event.error.map { String(cString: $0) } ?? "request failed"
            continuation.finish(throwing: ConvoyError(.engineFailed, message))
        } else {
            continuation.yield(Token(id: nil, text: text, finishReason: reason))
            continuation.finish()
        }
    }

    /// Polling failed (a bug in convoy): end every stream with the error.
    private func fail(_ error: ConvoyError) {
        lock.lock()
        closed = true
        failure = error
        let pending = routes
        routes = [:]
        lock.unlock()
        pending.values.forEach { $0.finish(throwing: error) }
    }

    /// Called once, from Engine.deinit: stops the dispatcher thread, then destroys the engine.
    func shutdown() {
        lock.lock()
        closed = true
        lock.unlock()
        exited.wait()
        lock.lock()
        let pending = routes
        routes = [:]
        lock.unlock()
        convoy_engine_destroy(handle)
        pending.values.forEach { $0.finish(throwing: ConvoyError(.shutDown, "the engine was destroyed")) }
    }
}
