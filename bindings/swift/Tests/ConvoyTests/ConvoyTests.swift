// Runs on the real model: CONVOY_MODEL=/path/to/SmolLM2-135M-Instruct.Q4_1.gguf swift test
// (`scripts/setup.sh --model-path` prints where `make model` put it). Skipped without it.
import XCTest

@testable import Convoy

final class ConvoyTests: XCTestCase {
    let system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

    func modelPath() throws -> String {
        guard let path = ProcessInfo.processInfo.environment["CONVOY_MODEL"] else {
            throw XCTSkip("set CONVOY_MODEL to the test model's path")
        }
        return path
    }

    func testBadModelPathThrowsModelNotFound() throws {
        XCTAssertThrowsError(try Engine(modelPath: "/nonexistent/model.gguf")) { error in
            XCTAssertEqual((error as? ConvoyError)?.status, .modelNotFound)
        }
    }

    func testChatKnownAnswer() async throws {
        let engine = try Engine(modelPath: try modelPath())
        var text = ""
        var last: Token?
        let chat = [ChatMessage(role: "system", content: system),
                    ChatMessage(role: "user", content: "What is the capital of France?")]
        for try await token in engine.generate(chat: chat, params: RequestParams(maxTokens: 20)) {
            text += token.text
            last = token
        }
        XCTAssertEqual(text, "The capital of France is Paris.")
        XCTAssertEqual(last?.finishReason, .stop)
        XCTAssertEqual(try engine.stats().requestsHeld, 0)
    }

    /// A repeated prompt reuses the prefix cache; a saved cache warms a new engine.
    func testPrefixCacheSaveAndReload() async throws {
        let path = FileManager.default.temporaryDirectory
            .appendingPathComponent("convoy-\(UUID().uuidString).safetensors").path
        defer { try? FileManager.default.removeItem(atPath: path) }
        let params = RequestParams(maxTokens: 8)
        let first: String
        do {
            let engine = try Engine(modelPath: try modelPath())
            first = try await engine.complete("The capital of France is", params: params)
            let again = try await engine.complete("The capital of France is", params: params)
            XCTAssertEqual(again, first)
            XCTAssertGreaterThan(try engine.stats().prefixCacheHits, 0)
            XCTAssertGreaterThan(try engine.savePrefixCache(to: path), 0)
        }
        let warm = try Engine(modelPath: try modelPath(), config: EngineConfig(prefixCachePath: path))
        XCTAssertEqual(try await warm.complete("The capital of France is", params: params), first)
        XCTAssertGreaterThan(try warm.stats().prefixCacheHitTokens, 0)
    }

    /// Concurrent streams (one dispatcher thread) give the same greedy text as one at a time.
    func testConcurrentStreamsMatchSequential() async throws {
        let engine = try Engine(modelPath: try modelPath(), config: EngineConfig(maxBatchSize: 8))
        let prompts = ["The capital of France is", "Once upon a time", "1, 2, 3, 4,", "Water boils at"]
        let params = RequestParams(maxTokens: 6)
        var sequential: [String] = []
        for prompt in prompts { sequential.append(try await engine.complete(prompt, params: params)) }
        let concurrent = try await withThrowingTaskGroup(of: (Int, String).self) { group in
            for (i, prompt) in prompts.enumerated() {
                group.addTask { (i, try await engine.complete(prompt, params: params)) }
            }
            var out = [String](repeating: "", count: prompts.count)
            for try await (i, text) in group { out[i] = text }
            return out
        }
        XCTAssertEqual(concurrent, sequential)
        XCTAssertEqual(try engine.stats().requestsHeld, 0)
    }

    /// Cancelling the consuming Task cancels the request; its FINISHED event is drained.
    func testTaskCancellationCancelsTheRequest() async throws {
        let engine = try Engine(modelPath: try modelPath())
        var params = RequestParams(maxTokens: 500)
        params.ignoreEOS = true
        let stream = engine.generate("Count from one to one thousand:", params: params)
        let task = Task {
            var count = 0
            for try await _ in stream { count += 1 }
            return count
        }
        try await Task.sleep(nanoseconds: 300_000_000)
        task.cancel()
        let count = try await task.value
        XCTAssertLessThan(count, 500)
        // The request leaves the engine once the dispatcher drained its FINISHED event.
        for _ in 0..<100 {
            if try engine.stats().requestsHeld == 0 { break }
            try await Task.sleep(nanoseconds: 50_000_000)
        }
        XCTAssertEqual(try engine.stats().requestsHeld, 0)
    }

    func testSubmissionErrorEndsTheStream() async throws {
        let engine = try Engine(modelPath: try modelPath())
        do {
            for try await _ in engine.generate("Hi", params: RequestParams(maxTokens: 0)) {}
            XCTFail("max_tokens 0 was accepted")
        } catch let error as ConvoyError {
            XCTAssertEqual(error.status, .invalidArgument)
        }
    }

    /// Destroying the engine ends open streams with shutDown.
    func testDeinitEndsOpenStreams() async throws {
        var engine: Engine? = try Engine(modelPath: try modelPath())
        var params = RequestParams(maxTokens: 500)
        params.ignoreEOS = true
        let stream = engine!.generate("Tell me a long story.", params: params)
        engine = nil
        do {
            for try await _ in stream {}
            XCTFail("the stream did not fail")
        } catch let error as ConvoyError {
            XCTAssertEqual(error.status, .shutDown)
        }
    }
}
