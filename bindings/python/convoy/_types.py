"""Plain Python values returned by the bindings (copied out of C memory at once)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import List, Optional, Tuple


class FinishReason(str, enum.Enum):
    """Why a request ended (``convoy_finish_reason``). A ``str`` enum: compares equal to
    ``"length"``, ``"stop"``, ``"cancelled"`` and ``"error"``."""

    NONE = "none"
    LENGTH = "length"
    STOP = "stop"
    CANCELLED = "cancelled"
    ERROR = "error"

    def __str__(self) -> str:
        return self.value


FINISH_REASONS = {
    0: FinishReason.NONE,
    1: FinishReason.LENGTH,
    2: FinishReason.STOP,
    3: FinishReason.CANCELLED,
    4: FinishReason.ERROR,
}


class BatchMode(enum.IntEnum):
    """``convoy_batch_mode``."""

    CONTINUOUS = 0
    STATIC = 1


class Weights(enum.IntEnum):
    """``convoy_weights``: what to do with quantized weights."""

    AUTO = 0
    DEQUANTIZE = 1
    KEEP_QUANTIZED = 2


@dataclass(frozen=True)
class Token:
    """One streamed piece of output.

    ``token_id`` is the generated token's id and ``text`` the UTF-8 text it adds (may be
    empty while a multi-byte character or a possible stop string is held back). The last
    item of a stream may have ``token_id`` None: text the request flushed when it finished.
    """

    token_id: Optional[int]
    text: str


@dataclass(frozen=True)
class RequestStats:
    """``convoy_request_stats`` of a finished request (times in seconds;
    ``cached_tokens``: prompt tokens taken from the prefix cache instead of being computed).
    A field is None if the library did not provide it."""

    prompt_tokens: Optional[int] = None
    generated_tokens: Optional[int] = None
    time_to_first_token: Optional[float] = None
    queue_time: Optional[float] = None
    prompt_tokens_per_second: Optional[float] = None
    generation_tokens_per_second: Optional[float] = None
    total_latency: Optional[float] = None
    cached_tokens: Optional[int] = None


@dataclass(frozen=True)
class Result:
    """How a request ended: ``finish_reason``, its ``stats`` (None when the request was
    released or its engine closed before it finished) and ``error`` (the message for
    ``FinishReason.ERROR``, else "")."""

    finish_reason: FinishReason
    stats: Optional[RequestStats] = None
    error: str = ""


@dataclass(frozen=True)
class Completion:
    """The outcome of :meth:`Engine.generate`: the generated ``text``, the generated token
    ids ``tokens``, ``finish_reason``, ``stats`` and the request ``id``."""

    text: str
    tokens: List[int]
    finish_reason: FinishReason
    stats: Optional[RequestStats]
    id: int = 0


@dataclass(frozen=True)
class ModelInfo:
    """What the engine's model is (``convoy_model_info``). A field is None if the library
    did not provide it."""

    name: Optional[str] = None
    architecture: Optional[str] = None
    context_length: Optional[int] = None
    vocab_size: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_ids: Tuple[int, ...] = field(default_factory=tuple)
    has_chat_template: Optional[bool] = None
    weight_dtype: Optional[str] = None
    backend: Optional[str] = None
    num_layers: Optional[int] = None
    hidden_size: Optional[int] = None
    num_heads: Optional[int] = None
    num_kv_heads: Optional[int] = None
    max_context: Optional[int] = None


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's counters (``convoy_engine_stats``; seconds and bytes).
    ``prefix_cache_*``: requests that reused a cached prefix, the prompt tokens they did not
    compute, bytes and entries held now (at most ``prefix_cache_bytes`` of the config), and
    entries evicted to stay within it. A field is None if the library did not provide it."""

    running: Optional[int] = None
    waiting: Optional[int] = None
    kv_tokens: Optional[int] = None
    steps: Optional[int] = None
    tokens_generated: Optional[int] = None
    requests_finished: Optional[int] = None
    step_seconds: Optional[float] = None
    mlx_seconds: Optional[float] = None
    eval_seconds: Optional[float] = None
    peak_memory_bytes: Optional[int] = None
    kv_bytes: Optional[int] = None
    requests_held: Optional[int] = None
    active_memory_bytes: Optional[int] = None
    cache_memory_bytes: Optional[int] = None
    prefilling: Optional[int] = None
    prefix_cache_hits: Optional[int] = None
    prefix_cache_hit_tokens: Optional[int] = None
    prefix_cache_bytes: Optional[int] = None
    prefix_cache_entries: Optional[int] = None
    prefix_cache_evictions: Optional[int] = None
