"""Pydantic models of the HTTP surface: OpenAI completions, classify, experts admin.

Requests are parsed with `parse_request(model_cls, body, limits)`: strict JSON types (no
"1" for 1, no true for 1), server limits from `Limits` through the validation context, and
unknown fields accepted, ignored and logged once per distinct set of names (vLLM's policy).
`CompletionRequest.to_sampling_params()` is the one converter into engine parameters.
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, WithJsonSchema
from pydantic import field_validator as validates
from pydantic_core import PydanticCustomError

from serving.config import LimitSettings, RoutingSettings
from serving.http import openapi
from serving.http.backend import MoraOverrides
from serving.http.errors import validation_error

logger = logging.getLogger(__name__)

MAX_STOP_SEQUENCES = 4
MAX_LOGPROBS = 5
INT64 = 2**63
_IGNORED_SEEN: set[frozenset[str]] = set()
_IGNORED_SEEN_MAX = 256

M = TypeVar("M", bound=BaseModel)
P = TypeVar("P")


@dataclass(frozen=True)
class Limits:
    """Server limits that request validation needs (from ApiSettings; the defaults are
    serving/config.py's)."""

    max_n: int = LimitSettings().max_n
    max_top_k: int = RoutingSettings().max_top_k
    max_prompts: int = LimitSettings().max_prompts


def _invalid(message: str) -> PydanticCustomError:
    return PydanticCustomError("invalid_value", message)


def _whole(value: Any) -> Any:
    """JSON has one number type: 2.0 is the integer 2 (JSON Schema says so too), 2.5 is not.
    Integer fields stay strict otherwise (no "2", no true)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _limits(info: ValidationInfo) -> Limits:
    return info.context.get("limits", Limits()) if info.context else Limits()


def parse_request(model_cls: type[M], body: bytes, limits: Limits) -> M:
    """Validate a JSON body into `model_cls`; any failure is a `BadRequest` naming the param."""
    try:
        parsed = model_cls.model_validate_json(body, context={"limits": limits})
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None
    extra = frozenset(parsed.model_extra or ())
    if extra and extra not in _IGNORED_SEEN and len(_IGNORED_SEEN) < _IGNORED_SEEN_MAX:
        _IGNORED_SEEN.add(extra)
        logger.warning(
            "%s: ignoring unsupported fields %s", model_cls.__name__, ", ".join(sorted(extra))
        )
    return parsed


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class _Closed(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class MoraOptions(_Closed):
    """Request extension `mora`: per-request routing overrides within server limits."""

    top_k: int | None = Field(None, ge=1)
    threshold: float | None = Field(None, ge=0.0, le=1.0)

    _whole_top_k = validates("top_k", mode="before")(_whole)

    @validates("top_k")
    @classmethod
    def _top_k_limit(cls, value: int | None, info: ValidationInfo) -> int | None:
        limit = _limits(info).max_top_k
        if value is not None and value > limit:
            raise _invalid(f"top_k must be at most {limit} on this server")
        return value

    def to_overrides(self) -> MoraOverrides:
        return MoraOverrides(top_k=self.top_k, threshold=self.threshold)


class StreamOptions(_Request):
    include_usage: bool = False


Prompt = str | list[str] | list[int] | list[list[int]]
Stop = str | list[str] | None


class CompletionRequest(_Request):
    """OpenAI `POST /v1/completions` (legacy completions) plus the `mora` extension."""

    # The documented schemas (`WithJsonSchema(openapi.X)`, rules across fields) say what the
    # validators below enforce; validation itself is unchanged by them.
    model_config = ConfigDict(json_schema_extra=openapi.COMPLETION_RULES)

    model: str
    prompt: Annotated[Prompt, WithJsonSchema(openapi.PROMPT)]
    echo: bool = False
    max_tokens: int | None = Field(16, ge=0)
    temperature: float | None = Field(1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    best_of: Annotated[int | None, WithJsonSchema(openapi.BEST_OF)] = None
    stop: Annotated[Stop, WithJsonSchema(openapi.stop(MAX_STOP_SEQUENCES))] = None
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    presence_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    suffix: Annotated[str | None, WithJsonSchema(openapi.SUFFIX)] = None
    logit_bias: Annotated[dict[str, float] | None, WithJsonSchema(openapi.LOGIT_BIAS)] = None
    mora: MoraOptions | None = None

    _whole_numbers = validates("max_tokens", "n", "best_of", "seed", "logprobs", mode="before")(
        _whole
    )

    @validates("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, list):  # token ids written as whole floats are ids
            value = [[_whole(i) for i in v] if isinstance(v, list) else _whole(v) for v in value]

        def is_ids(item: Any) -> bool:
            return isinstance(item, list) and all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in item
            )

        ok = (
            isinstance(value, str)
            or (isinstance(value, list) and all(isinstance(item, str) for item in value))
            or is_ids(value)
            or (isinstance(value, list) and all(is_ids(item) for item in value))
        )
        if not ok:
            raise _invalid(
                "prompt must be a string, a list of strings, a list of token ids (>= 0) or "
                "a list of token id lists"
            )
        if isinstance(value, list) and not value:
            raise _invalid("prompt must not be an empty list")
        count = len(value) if isinstance(value, list) and not is_ids(value) else 1
        if count > _limits(info).max_prompts:
            raise _invalid(f"at most {_limits(info).max_prompts} prompts per request")
        return value

    @validates("max_tokens")
    @classmethod
    def _echo_only(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value == 0 and not info.data.get("echo"):
            raise _invalid("max_tokens must be at least 1 (0 is only allowed with echo)")
        return value

    @validates("n")
    @classmethod
    def _n_limit(cls, value: int, info: ValidationInfo) -> int:
        if value > _limits(info).max_n:
            raise _invalid(f"n must be at most {_limits(info).max_n} on this server")
        return value

    @validates("best_of")
    @classmethod
    def _best_of(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and value != info.data.get("n", 1):
            raise _invalid("best_of is not supported (only best_of == n)")
        return value

    @validates("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP_SEQUENCES:
            raise _invalid(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(not stop for stop in stops):
            raise _invalid("stop sequences must not be empty")
        return value

    @validates("stream_options")
    @classmethod
    def _stream_only(cls, value: StreamOptions | None, info: ValidationInfo) -> Any:
        if value is not None and not info.data.get("stream"):
            raise _invalid("stream_options is only allowed when stream is true")
        return value

    @validates("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value is not None:
            raise _invalid("suffix is not supported")
        return value

    @validates("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            raise _invalid("logit_bias is not supported (only an empty object)")
        return value

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def prompts(self) -> list[str] | list[list[int]]:
        """The prompt as a list of prompts (each a string or a list of token ids)."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and isinstance(self.prompt[0], int):
            return [list(self.prompt)]  # type: ignore[arg-type]
        return list(self.prompt)  # type: ignore[arg-type]

    def to_sampling_params(self, params_cls: type[P], *, index: int = 0) -> P:
        """Engine parameters for choice `index` (its seed is `seed + index`).

        `max_tokens == 0` (echo only) still asks the engine for one token: the caller drops
        it, since the engine needs at least one step to score the prompt.
        """
        mora = self.mora or MoraOptions()
        want_prompt = self.echo and self.logprobs is not None
        return params_cls(
            max_tokens=max(self.max_tokens if self.max_tokens is not None else 16, 1),
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=None if self.seed is None else self.seed + index,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logprobs=self.logprobs,
            prompt_logprobs=self.logprobs if want_prompt else None,
            stop_token_ids=(),
            ignore_eos=False,
            top_k=mora.top_k,
            threshold=mora.threshold,
        )


class ClassifyRequest(_Request):
    """`POST /classify` as JSON: base64 images (a `data:image/...;base64,` prefix is fine)."""

    model: str | None = None
    images: list[str] = Field(min_length=1)
    labels: Annotated[list[str] | None, WithJsonSchema(openapi.LABELS)] = None
    top_k: int | None = Field(None, ge=1)
    mora: MoraOptions | None = None

    _whole_top_k = validates("top_k", mode="before")(_whole)


class ExpertLoadRequest(_Closed):
    """`POST /v1/experts` as JSON: load the set at `path`, relative to the expert store."""

    path: str = Field(
        min_length=1, max_length=1024, json_schema_extra={"pattern": openapi.STORE_PATH}
    )
    model: str | None = None

    @validates("path")
    @classmethod
    def _inside_store(cls, value: str) -> str:
        slashed = value.replace("\\", "/")
        if (
            value.startswith(("/", "\\", "~"))
            or (len(value) > 1 and value[1] == ":")
            or ".." in slashed.split("/")  # any `..`, as the store refuses: even one back inside
            or "\x00" in value
        ):
            raise _invalid("path must be relative to the expert store, without '..' components")
        return posixpath.normpath(slashed)
