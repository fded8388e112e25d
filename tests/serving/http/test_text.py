"""Detokenisation, stop strings and logprobs blocks, with a byte-level fake tokenizer."""

from __future__ import annotations

import asyncio

import pytest

from serving.http.text import (
    ChoiceText,
    IncrementalDetokenizer,
    StopMatcher,
    logprobs_block,
    prompt_logprobs,
)
from tests.serving.fakes import adecode, decode, encode

TEXTS = ["plain ascii", "héllo wörld", "snow ☃ and € and 🎉!", "日本語のテキスト", "🎉"]


def run(coro):
    return asyncio.run(coro)


async def stream(ids: list[int], context: list[int] | None = None) -> list[str]:
    detok = IncrementalDetokenizer(adecode, context or [])
    deltas = [await detok.push(i) for i in ids]
    return [*deltas, await detok.flush()]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("context", ["", "prompt: ", "ends in ü"])
def test_deltas_join_to_the_decoded_text_and_never_hold_replacements(text, context):
    deltas = run(stream(encode(text), encode(context)))
    assert "".join(deltas) == text
    assert all("\ufffd" not in delta for delta in deltas)


def test_multibyte_character_is_held_until_complete():
    deltas = run(stream(encode("a€b")))  # € is three bytes
    assert deltas[:5] == ["a", "", "", "€", "b"]


def test_truncated_character_is_flushed_as_replacement():
    ids = encode("ok€")[:-1]
    deltas = run(stream(ids))
    assert "".join(deltas) == decode(ids) == "ok\ufffd"


@pytest.mark.parametrize(
    ("stops", "chunks", "emitted", "stopped"),
    [
        ((), ["abc", "def"], "abcdef", False),
        (("X",), ["abXcd"], "ab", True),
        (("END",), ["ab", "E", "N", "D", "zz"], "ab", True),  # split across pushes
        (("END",), ["ab", "EN", "x"], "abENx", False),  # a false start is released
        (("ab", "b"), ["xab"], "x", True),  # earliest match wins
        (("abcab",), ["xabca", "b"], "x", True),  # overlapping prefix
        (("abcab",), ["xabca", "c"], "xabcac", False),
        (("\n\n",), ["line\n", "\n", "next"], "line", True),
    ],
)
def test_stop_matcher(stops, chunks, emitted, stopped):
    matcher = StopMatcher(stops)
    out = ""
    for chunk in chunks:
        text, hit = matcher.push(chunk)
        out += text
        if hit:
            break
    out += matcher.flush()
    assert (out, matcher.stopped) == (emitted, stopped)


def test_stop_matcher_holds_back_only_possible_prefixes():
    matcher = StopMatcher(["STOP"])
    assert matcher.push("abST") == ("ab", False)
    assert matcher.push("x") == ("STx", False)


async def choice_pieces(text: str, **kwargs):
    choice = ChoiceText(adecode, **kwargs)
    pieces = []
    for step, token in enumerate(encode(text)):
        piece = await choice.push(token, -0.5 * step, [(token, -0.5 * step), (35, -9.0)])
        pieces.append(piece)
        if piece.finish_reason:
            return pieces
    pieces.append(await choice.finish("length"))
    return pieces


@pytest.mark.parametrize(
    ("text", "stops", "expected", "reason"),
    [
        ("hello world", (), "hello world", "length"),
        ("hello world", ("o w",), "hell", "stop"),
        ("hello world", ("d",), "hello worl", "stop"),
        ("hello world", ("h",), "", "stop"),
        ("a€b€c", ("€c",), "a€b", "stop"),
    ],
)
def test_choice_text_cuts_at_stop_and_logprobs_cover_the_returned_text(
    text, stops, expected, reason
):
    pieces = run(choice_pieces(text, stops=stops, logprobs=2, offset=3))
    assert "".join(p.text for p in pieces) == expected
    assert [p.finish_reason for p in pieces].count(reason) == 1
    assert pieces[-1].finish_reason == reason
    entries = [e for p in pieces for e in p.logprobs]
    offsets = [e.offset for e in entries]
    assert offsets == sorted(offsets)
    assert all(3 <= offset < 3 + len(expected) for offset in offsets)
    # every token whose text starts inside the returned text is there, and no other
    starts = {len(decode(encode(text)[:i])) for i in range(len(encode(text)))}
    assert {o - 3 for o in offsets} == {s for s in starts if s < len(expected)}


def test_streamed_logprobs_arrive_with_their_text():
    pieces = run(choice_pieces("ab€", logprobs=1))
    # "€" is three byte tokens: its three entries arrive with the piece that shows it
    assert [(p.text, len(p.logprobs)) for p in pieces] == [
        ("a", 1),
        ("b", 1),
        ("", 0),
        ("", 0),
        ("€", 3),
        ("", 0),
    ]


def test_logprobs_block_shape_and_top_logprobs_include_the_sampled_token():
    pieces = run(choice_pieces("hi", logprobs=2))
    block = logprobs_block([e for p in pieces for e in p.logprobs])
    assert block["tokens"] == ["h", "i"]
    assert block["token_logprobs"] == [0.0, -0.5]
    assert block["text_offset"] == [0, 1]
    assert block["top_logprobs"] == [{"h": 0.0, "#": -9.0}, {"i": -0.5, "#": -9.0}]


def test_logprobs_zero_gives_no_top_logprobs():
    pieces = run(choice_pieces("hi", logprobs=0))
    block = logprobs_block([e for p in pieces for e in p.logprobs])
    assert block["top_logprobs"] == [None, None]
    assert block["token_logprobs"] == [0.0, -0.5]


def test_prompt_logprobs_first_token_is_null_and_offsets_follow_the_text():
    ids = encode("aé b")
    scores = [(None, ())] + [(-1.0, ((i, -1.0),)) for i in ids[1:]]
    entries = run(prompt_logprobs(adecode, ids, scores))
    assert entries[0].logprob is None and entries[0].top is None
    assert [e.offset for e in entries] == [0, 1, 1, 2, 3]
    assert [e.logprob for e in entries[1:]] == [-1.0] * 4
