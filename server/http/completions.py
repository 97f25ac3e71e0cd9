"""OpenAI `/v1/completions`: the request body -> GenerateParams, and the response objects.

Pure. Fields that mean nothing for these models are refused with the reason (not ignored);
docs/protocols.md lists them.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from rnnserve.server.engine import GenerateParams
from rnnserve.server.errors import BadRequest
from rnnserve.server.sampling import SamplingParams

DEFAULT_MAX_TOKENS = 16  # OpenAI's default (rnnserve.v1 Generate defaults to 64)
MAX_PROMPTS = 64
MAX_TOP_LOGPROBS = 20  # vLLM's default max_logprobs (OpenAI's legacy API took 5)

# field -> why it is refused unless it has its neutral value
REFUSED = {
    "n": "only n=1: send the prompt again (with another seed) for more completions",
    "best_of": "only best_of=1: the server returns every completion it makes",
    "suffix": "insertion is not done by completions; use KServe infer with `left`/`right` "
    "or rnnserve.v1 Infill",
    "presence_penalty": "penalties are not supported; it must be 0",
    "frequency_penalty": "penalties are not supported; it must be 0",
    "logit_bias": "logit_bias is not supported",
    # vLLM's extensions, which clients written for vLLM send at their defaults
    "repetition_penalty": "penalties are not supported; it must be 1",
    "length_penalty": "beam search is not done; it must be 1",
    "use_beam_search": "beam search is not done; it must be false",
    "min_tokens": "min_tokens is not supported (a completion ends when the model makes "
    "<eos>); it must be 0",
    "min_p": "min_p is not supported (use top_p or top_k); it must be 0",
    "ignore_eos": "ignore_eos is not supported; it must be false",
    "stop_token_ids": "stop_token_ids is not supported; use stop strings",
    "include_stop_str_in_output": "the stop string is never returned; it must be false",
    "skip_special_tokens": "special tokens are never in the text; it must be true",
    "spaces_between_special_tokens": "special tokens are never in the text; it must be true",
}
NEUTRAL: dict[str, tuple] = {
    "n": (None, 1),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "repetition_penalty": (None, 1, 1.0),
    "length_penalty": (None, 1, 1.0),
    "use_beam_search": (None, False),
    "min_tokens": (None, 0),
    "min_p": (None, 0, 0.0),
    "ignore_eos": (None, False),
    "stop_token_ids": (None, []),
    "include_stop_str_in_output": (None, False),
    "skip_special_tokens": (None, True),
    "spaces_between_special_tokens": (None, True),
}
FLAG = "true or false"
KIND = {
    "n": "an integer",
    "best_of": "an integer",
    "suffix": "a string",
    "presence_penalty": "a number",
    "frequency_penalty": "a number",
    "logit_bias": "an object",
    "repetition_penalty": "a number",
    "length_penalty": "a number",
    "use_beam_search": FLAG,
    "min_tokens": "an integer",
    "min_p": "a number",
    "ignore_eos": FLAG,
    "stop_token_ids": "a list of integers",
    "include_stop_str_in_output": FLAG,
    "skip_special_tokens": FLAG,
    "spaces_between_special_tokens": FLAG,
}
ACCEPTED = {
    "model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
    "logprobs", "echo", "stream", "stream_options", "user", *REFUSED,
}  # fmt: skip


@dataclass
class CompletionRequest:
    """A validated completions request: one GenerateParams per prompt."""

    model: str
    prompts: list[str]
    max_tokens: int
    sampling: SamplingParams
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: none; 0: each token's; N: and the N likeliest
    echo: bool = False
    stream: bool = False
    include_usage: bool = False  # a stream's last chunk: usage, with no choices (OpenAI's)
    version: str = ""  # the default version, resolved once: every prompt and score use it

    def params(self, prompt: str) -> GenerateParams:
        return GenerateParams(
            prompt=prompt, max_tokens=self.max_tokens, sampling=self.sampling, stop=self.stop
        )


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(name, f"must be a number, got {value!r}")
    # compared before isfinite(): a JSON integer past float's range (400 digits) would
    # raise OverflowError there; Python compares int with float exactly, and NaN fails too
    if not (low <= value <= high and math.isfinite(value)):
        raise BadRequest(name, f"must be in [{low:g}, {high:g}], got {value}")
    return float(value)


def _integer(body: dict, name: str, default: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(name, f"must be an integer, got {value!r}")
    return value


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequest(name, f"must be true or false, got {value!r}")
    return value


def _strings(value: object, name: str) -> list[str]:
    if isinstance(value, str):
        found = [value]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        found = list(value)
    else:
        raise BadRequest(name, "must be a string or a list of strings")
    for i, text in enumerate(found):
        try:  # JSON's "\ud800" (a lone surrogate) is no text: KServe and gRPC refuse it too
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            where = name if isinstance(value, str) else f"{name}[{i}]"
            raise BadRequest(
                where, f"is not valid Unicode text (a lone surrogate at {exc.start})"
            ) from None
    return found


def parse_completion(body: object, max_tokens_limit: int | None = None) -> CompletionRequest:
    """Validates a /v1/completions body; BadRequest names the field (OpenAI's `param`)."""
    if not isinstance(body, dict):
        raise BadRequest("request", "the body must be a JSON object")
    unknown = sorted(set(body) - ACCEPTED)
    if unknown:
        raise BadRequest(unknown[0], "is not a completions field this server knows")
    for name, why in REFUSED.items():
        value = body.get(name)
        # True == 1 and False == 0 (and 1.0 == True): either would pass as the other's neutral
        flag = KIND[name] == FLAG
        if value is not None and isinstance(value, bool) != flag:
            raise BadRequest(name, f"must be {KIND[name]}, got {value!r}")
        if value not in NEUTRAL[name]:
            raise BadRequest(name, why)
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise BadRequest("user", f"must be a string, got {user!r}")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("model", "is required (a model name from GET /v1/models)")
    if "prompt" not in body:
        raise BadRequest("prompt", "is required")
    prompt = body["prompt"]
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], str):
        raise BadRequest("prompt", "token-id prompts are not supported; send text")
    prompts = _strings(prompt, "prompt")
    if not 1 <= len(prompts) <= MAX_PROMPTS:
        raise BadRequest("prompt", f"must hold 1..{MAX_PROMPTS} prompts, got {len(prompts)}")
    for i, text in enumerate(prompts):
        if not text:  # told here: the engine's message names its own resume state
            where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
            raise BadRequest(where, "is empty; the model needs text to continue")
    stop = _strings(body["stop"], "stop") if body.get("stop") is not None else []
    logprobs = _integer(body, "logprobs", None)
    if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
        raise BadRequest("logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}], got {logprobs}")
    echo = _flag(body, "echo")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise BadRequest("stream_options", 'only {"include_usage": bool} is known')
    include_usage = _flag(options, "include_usage") if options else False
    stream = _flag(body, "stream")
    if options is not None and not stream:  # as OpenAI and vLLM: not silently dropped
        raise BadRequest("stream_options", "is only allowed when stream is true")
    if stream and logprobs:  # a message's value is a sum over its tokens: no alternatives
        raise BadRequest(
            "logprobs", "top alternatives (logprobs > 0) come in plain responses, not streams"
        )
    seed = _integer(body, "seed", None)
    if seed is not None and not 0 <= seed < 2**63:
        raise BadRequest("seed", f"must be in [0, 2^63), got {seed}")
    top_k = _integer(body, "top_k", 0) or 0
    if top_k < 0:
        raise BadRequest("top_k", f"must be 0 (off) or more, got {top_k}")
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:
        raise BadRequest("top_p", "must be in (0, 1]")
    # unset: OpenAI's 16, or the server's --max-tokens when that is lower (as for Generate)
    default = min(DEFAULT_MAX_TOKENS, max_tokens_limit or DEFAULT_MAX_TOKENS)
    max_tokens = _integer(body, "max_tokens", default)
    if max_tokens is None or max_tokens < 0:
        raise BadRequest(
            "max_tokens", f"must be at least 1 (0 with echo scores the prompt), got {max_tokens}"
        )
    # 0 scores the prompt alone (echo + logprobs, as evaluation harnesses ask the legacy API)
    if max_tokens == 0 and not (echo and not stream):
        raise BadRequest("max_tokens", "0 (score the prompt alone) needs echo, and no stream")
    return CompletionRequest(
        model=model,
        prompts=prompts,
        max_tokens=max_tokens,
        sampling=SamplingParams(
            temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
            top_k=top_k,
            top_p=0.0 if top_p == 1.0 else top_p,  # 1 keeps every token: the engine's "off"
            seed=seed,
        ),
        stop=stop,
        logprobs=logprobs,
        echo=echo,
        stream=stream,
        include_usage=include_usage,
    )


FINISH = {"length": "length", "stop": "stop", "eos": "stop"}


def generated(token_ids: list[int], finish: str | None) -> int:
    """How many tokens the model generated in a message of the engine: its `token_ids`, and
    the end-of-sequence token that ended the stream (`finish` "eos"), which the engine does
    not show (no text, not in token_ids) but the model did generate. vLLM counts it in
    `completion_tokens`; counted here for plain and streamed responses alike."""
    return len(token_ids) + (1 if finish == "eos" else 0)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@dataclass(frozen=True)
class Folded:
    """`text` with each character as the tokenizer normalises it on its own, and where each
    character of that came from. Tokens come from the normalised text and are searched for
    in `search`, then reported where they stand in the text the client sees."""

    search: str
    # (where a character's normal form starts in search, its index in text, where it ends)
    # for each character whose normal form is not one character long, in order
    marks: list[tuple[int, int, int]]

    def origin(self, at: int) -> int:
        """The index in the text of the character `search[at]` comes from."""
        k = bisect.bisect_right(self.marks, (at, math.inf)) - 1
        if k < 0:
            return at
        _, index, end = self.marks[k]
        return index if at < end else at - (end - index - 1)


def folded(text: str, normalize: Callable[[str], str]) -> Folded:
    """`text` with each character replaced by its own normal form: "T" -> "t", "," -> " "
    with letters_only, and "…" -> "...", "ﬁ" -> "fi", "İ" -> "i̇" (NFKC and lower() may give
    several characters; each of them maps back to the one it came from). Such a character
    was kept as it was, so its tokens were not found and the search for them ran on to a
    later "." or "i" of the text, which misplaced every token after it."""
    # once per distinct character, and str.translate / re in C: a prompt may be megabytes
    each = {ch: normalize(ch) or ch for ch in set(text)}
    grown = "".join(re.escape(ch) for ch, norm in each.items() if len(norm) != 1)
    marks: list[tuple[int, int, int]] = []
    extra = 0  # how much longer search is than text before the character at hand
    for found in re.finditer(f"[{grown}]", text) if grown else ():
        i, size = found.start(), len(each[found.group()])
        marks.append((i + extra, i, i + extra + size))
        extra += size - 1
    return Folded(text.translate({ord(ch): norm for ch, norm in each.items()}), marks)


def token_logprobs(
    text: str,
    tokens: list[str],
    values: list[float | None],
    normalize: Callable[[str], str] | None = None,
    top: list[dict[str, float] | None] | None = None,
) -> dict:
    """OpenAI's legacy logprobs object for `text`, whose tokens are `tokens` (normalised by
    `normalize`, the tokenizer's: each offset is where its token stands in `text`); `top`:
    each token's likeliest alternatives (logprobs > 0), else null. A token not found (its
    characters compose only in the whole text's normal form) stands at the next character
    that is not a space, and the search goes on after that character."""
    fold = folded(text, normalize) if normalize is not None else Folded(text, [])
    search, offsets, at = fold.search, [], 0
    for tok in tokens:
        found = search.find(tok, at) if tok else -1
        if found >= 0:
            offsets.append(fold.origin(found))
            at = found + len(tok)
            continue
        start = at
        while not tok.isspace() and start < len(search) and search[start].isspace():
            start += 1
        offsets.append(fold.origin(start))
        if tok:  # it stands there: the next token is searched for after it
            at = min(start + 1, len(search))
    return {
        "tokens": tokens,
        "token_logprobs": values,
        "top_logprobs": top,
        "text_offset": offsets,
    }


def ended(
    logprobs: dict, token: str, value: float, top: dict[str, float] | None, offset: int
) -> dict:
    """`logprobs` with the end-of-sequence token that ended the completion as its last entry,
    as vLLM lists it (it counts in completion_tokens): `token` its vocabulary name, which the
    text lacks (as vLLM's "</s>"), at `offset`, the end of the text."""
    tops = logprobs["top_logprobs"]
    return {
        "tokens": [*logprobs["tokens"], token],
        "token_logprobs": [*logprobs["token_logprobs"], value],
        "top_logprobs": None if tops is None else [*tops, top],
        "text_offset": [*logprobs["text_offset"], offset],
    }


def past_text(text: str, pieces: list[str]) -> str:
    """What a completion's tokens (`pieces`, each token's streamed text) spell past its
    `text`: on a stop string, the stop string and whatever its last token held after it (the
    text is cut there, the tokens are not); else nothing."""
    spelled = "".join(pieces)
    return spelled[len(text) :] if spelled.startswith(text) else ""


def message_logprobs(pieces: list[str], logprob: float, offset: int) -> dict:
    """A streamed message's logprobs: its tokens (`pieces`, each one's text) as one entry,
    the text they spell (which the message's `text` may lack: a stop string's), with their
    summed logprob, at `offset` in what the stream's tokens spell; a message without tokens
    (held-back text let go) has none."""
    if not pieces:
        return token_logprobs("", [], [])
    spelled = "".join(pieces)
    return token_logprobs(spelled, [spelled], [logprob]) | {"text_offset": [offset]}


def choice(index: int, text: str, finish: str | None, logprobs: dict | None) -> dict:
    return {
        "text": text,
        "index": index,
        "logprobs": logprobs,
        "finish_reason": FINISH.get(finish) if finish else None,
    }


def completion(rid: str, created: int, model: str, choices: list[dict], use: dict) -> dict:
    return {
        "id": f"cmpl-{rid}",
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": use,
    }
