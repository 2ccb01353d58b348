"""Python bindings for convoy: in-process LLM inference with continuous batching on MLX.

Pure Python over the installed C library (``libconvoy.so``) through ctypes; no compiled
extension. The library is found through ``$CONVOY_LIBRARY`` (a path), then
``pkg-config --variable=libdir convoy`` (an installed tree), then
``ctypes.util.find_library("convoy")``; it is loaded on first use and must have ABI
version 1.

Quick start::

    import convoy

    with convoy.Engine("SmolLM2-135M-Instruct.Q4_1.gguf", max_batch_size=16) as engine:
        print(engine.generate(messages=[{"role": "user", "content": "Hi!"}], max_tokens=32).text)
        for token in engine.stream("Once upon a time", max_tokens=32):
            print(token.text, end="", flush=True)

    # asyncio: many requests share every forward pass
    answers = await asyncio.gather(*(engine.agenerate(q, max_tokens=32) for q in questions))
"""

from __future__ import annotations

from ._engine import POLL_TIMEOUT_MS, AsyncRequest, Engine, Request
from ._errors import (
    BusyError,
    ConvoyError,
    CorruptModelError,
    EngineFailedError,
    InvalidArgumentError,
    InvalidUtf8Error,
    IoError,
    LibraryError,
    MlxError,
    ModelNotFoundError,
    NullPointerError,
    PanicError,
    PromptTooLongError,
    RequestError,
    ShutDownError,
    Status,
    TemplateError,
    TokenizerError,
    UnknownRequestError,
    UnsupportedModelError,
)
from ._lib import ABI_VERSION
from ._lib import load as _load
from ._types import (
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

__version__ = "0.2.0"


def version() -> str:
    """The loaded library's version (``convoy_version()``), e.g. "0.2.0"."""
    return _load().version().decode()


def abi_version() -> int:
    """The loaded library's ABI version (always :data:`ABI_VERSION` once loaded)."""
    return int(_load().abi_version())


def backend() -> str:
    """The MLX backend compiled into the library: "cpu", "metal" or "cuda"."""
    return _load().backend().decode()


def library_path() -> str:
    """The path (or name) libconvoy was loaded from."""
    return _load().path


def status_str(status: int) -> str:
    """The library's static text for a status code (``convoy_status_str``)."""
    return _load().status_str(int(status)).decode()


__all__ = [
    "ABI_VERSION",
    "POLL_TIMEOUT_MS",
    "AsyncRequest",
    "BatchMode",
    "BusyError",
    "Completion",
    "ConvoyError",
    "CorruptModelError",
    "Engine",
    "EngineFailedError",
    "EngineStats",
    "FinishReason",
    "InvalidArgumentError",
    "InvalidUtf8Error",
    "IoError",
    "LibraryError",
    "MlxError",
    "ModelInfo",
    "ModelNotFoundError",
    "NullPointerError",
    "PanicError",
    "PromptTooLongError",
    "Request",
    "RequestError",
    "RequestStats",
    "Result",
    "ShutDownError",
    "Status",
    "TemplateError",
    "Token",
    "TokenizerError",
    "UnknownRequestError",
    "UnsupportedModelError",
    "Weights",
    "abi_version",
    "backend",
    "library_path",
    "status_str",
    "version",
]
