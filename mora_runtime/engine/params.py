"""Per-request sampling parameters: plain data, no torch, so the HTTP surface can build them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # top-N alternatives per generated token; None = none
    prompt_logprobs: int | None = None  # the same for prompt tokens (echo + logprobs)
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    top_k: int | None = None  # per-request MoRA routing overrides
    threshold: float | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")

    @property
    def penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)
