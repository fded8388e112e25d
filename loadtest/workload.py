"""What to send and when: length distributions, the request mix, prompts, test images and
arrival schedules. Everything is drawn from one seeded `random.Random`, so a seed gives the
same requests in the same order (open loop: at the same planned times too).
"""

from __future__ import annotations

import base64
import io
import math
import random
from dataclasses import dataclass

KINDS = ("completions", "stream", "classify")

# Common English words: SmolLM2's tokenizer (and most BPE vocabularies) spends about one token
# on each, so a prompt of N words is roughly N tokens. The report states the real counts.
_WORD_TEXT = (
    "the of and to in is was for on that with as by at from his her they this had not are "
    "but one which have were all an been their has when who more can there will so would "
    "about into time only other new some could these two may first then do any like my now "
    "over such our man me even most made after also did many before must through back years "
    "where much your way well down should because each just those people how too little "
    "state good very make world still own see men work long get here between both life being "
    "under never day same another know while last might us great old year off come since "
    "against go came right used take three river garden morning story city light music "
    "question answer model expert token river mountain window letter travel kitchen"
)
_WORDS = _WORD_TEXT.split()
_OPENERS = (
    "Write a short story about",
    "Explain in simple words",
    "Continue this text:",
    "Summarise the following:",
    "Answer briefly:",
)


class WorkloadError(ValueError):
    """A malformed --mix, length distribution or schedule option."""


@dataclass(frozen=True)
class Dist:
    """A distribution of positive integers: `N`, `const:N`, `uniform:LO,HI`,
    `normal:MEAN,STD`, `lognormal:MEDIAN,SIGMA`, or `choice:A,B,C`."""

    kind: str
    params: tuple[float, ...]

    @classmethod
    def parse(cls, text: str) -> Dist:
        text = text.strip()
        kind, _, rest = text.partition(":")
        if not rest:
            kind, rest = "const", text
        try:
            params = tuple(float(p) for p in rest.split(","))
        except ValueError:
            raise WorkloadError(f"bad distribution {text!r}: numbers expected") from None
        arity = {"const": 1, "uniform": 2, "normal": 2, "lognormal": 2}
        if kind == "choice":
            if not params:
                raise WorkloadError(f"bad distribution {text!r}: no choices")
        elif kind not in arity:
            raise WorkloadError(
                f"unknown distribution {kind!r} (const, uniform, normal, lognormal, choice)"
            )
        elif len(params) != arity[kind]:
            raise WorkloadError(f"{kind} takes {arity[kind]} parameter(s): {text!r}")
        if any(p < 0 or not math.isfinite(p) for p in params):
            raise WorkloadError(f"bad distribution {text!r}: parameters must be >= 0")
        if kind == "uniform" and params[0] > params[1]:
            raise WorkloadError(f"bad distribution {text!r}: LO > HI")
        return cls(kind, params)

    def sample(self, rng: random.Random) -> int:
        p = self.params
        if self.kind == "const":
            value = p[0]
        elif self.kind == "uniform":
            value = rng.uniform(p[0], p[1])
        elif self.kind == "normal":
            value = rng.gauss(p[0], p[1])
        elif self.kind == "lognormal":
            value = p[0] * math.exp(rng.gauss(0.0, p[1]))
        else:
            value = rng.choice(p)
        return max(1, round(value))

    def __str__(self) -> str:
        return f"{self.kind}:{','.join(f'{v:g}' for v in self.params)}"


def parse_mix(text: str) -> dict[str, float]:
    """`completions=0.6,stream=0.3,classify=0.1` -> normalised weights (zeros dropped)."""
    weights: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or name not in KINDS:
            raise WorkloadError(f"bad --mix entry {part!r}: use {'/'.join(KINDS)}=WEIGHT")
        try:
            weights[name] = float(value)
        except ValueError:
            raise WorkloadError(f"bad weight in --mix entry {part!r}") from None
        if weights[name] < 0 or not math.isfinite(weights[name]):
            raise WorkloadError(f"bad weight in --mix entry {part!r}")
    total = sum(weights.values())
    if total <= 0:
        raise WorkloadError("--mix needs at least one positive weight")
    return {k: v / total for k, v in weights.items() if v > 0}


@dataclass(frozen=True)
class RequestSpec:
    id: int
    kind: str
    at: float | None  # planned send time (open loop), None in closed loop
    prompt: str = ""
    max_tokens: int = 0
    image_seed: int = 0


class RequestFactory:
    """Draws the next request: kind from the mix, prompt and length from the distributions."""

    def __init__(
        self, mix: dict[str, float], prompt_len: Dist, max_tokens: Dist, seed: int
    ) -> None:
        self.kinds = list(mix)
        self.weights = [mix[k] for k in self.kinds]
        self.prompt_len = prompt_len
        self.max_tokens = max_tokens
        self.rng = random.Random(seed)
        self.next_id = 0

    def make(self, at: float | None = None) -> RequestSpec:
        rng = self.rng
        kind = rng.choices(self.kinds, self.weights)[0]
        spec = RequestSpec(
            id=self.next_id,
            kind=kind,
            at=at,
            prompt=make_prompt(rng, self.prompt_len.sample(rng)),
            max_tokens=self.max_tokens.sample(rng),
            image_seed=rng.randrange(1 << 30),
        )
        self.next_id += 1
        return spec


def make_prompt(rng: random.Random, words: int) -> str:
    opener = rng.choice(_OPENERS)
    body = " ".join(rng.choice(_WORDS) for _ in range(max(words - len(opener.split()), 1)))
    return f"{opener} {body}"


def arrival_times(
    rate: float, duration_s: float, arrival: str, rng: random.Random, max_requests: int
) -> list[float]:
    """Planned send times in [0, duration_s): Poisson (exponential gaps) or constant."""
    if rate <= 0:
        raise WorkloadError("--rate must be > 0")
    times: list[float] = []
    t = 0.0
    while len(times) < max_requests:
        if arrival == "poisson":
            t += rng.expovariate(rate)
        elif arrival == "constant":
            t = len(times) / rate
        else:
            raise WorkloadError(f"unknown arrival process {arrival!r} (poisson, constant)")
        if t >= duration_s:
            break
        times.append(t)
    return times


def sample_image_png(seed: int, size: int = 64) -> str:
    """A small PNG (a coloured disc or square on a plain background), base64-encoded."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    colours = [(220, 40, 40), (40, 160, 60), (40, 80, 220), (230, 200, 40), (20, 20, 20)]
    background, fill = rng.sample(colours, 2)
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    margin = rng.randint(6, size // 4)
    box = (margin, margin, size - margin, size - margin)
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()
