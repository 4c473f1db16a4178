"""What a request to the generation routes may ask, checked before transformers' handlers read it.

transformers' handlers (5.25) convert fields with ``int()``/``float()`` and index into messages as they go, so a
field of the wrong type or range is a 500 or, worse, a silent 200 (``max_tokens: 1.5`` generates one token,
``temperature: -1`` is greedy). ``check_request`` checks every field a route reads (``ValueError`` naming the field,
what it must be and what came: a 400), and ``bound_length`` bounds what the request generates:

- the prompt and the answer fit in the model's context (transformers already refuses a prompt that fills it);
- an explicit ``max_tokens`` / ``max_completion_tokens`` / ``max_output_tokens`` / ``generation_config``
  ``max_new_tokens`` that does not fit, or is over the server's cap (``RequestLimits.max_new_tokens``,
  ``lafn serve --max-new-tokens``), is refused, as the OpenAI API refuses it; without one, the answer may take the
  rest of the context, up to the cap;
- ``generation_config`` takes only the generation settings in ``GENERATION_SETTINGS`` (not ``generate()``'s other
  keywords: ``stopping_criteria``, ``input_ids``, ``return_dict_in_generate`` ...), each of its type, and
  ``min_new_tokens`` / ``min_length`` / ``max_length`` within the same bounds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

__all__ = ["GENERATION_SETTINGS", "LENGTH_FIELD", "RequestLimits", "bound_length", "check_request"]

LENGTH_FIELD = "lafn_length_field"  # generation keyword: which request field set max_new_tokens (absent: none)
ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
PART_TYPES = ("text", "input_text", "output_text")  # an EditableCausalLM reads text only
MAX_STOP = 4  # as the OpenAI API
COMPLETIONS, CHAT, RESPONSES = "completions", "chat", "responses"


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask of the served model, on top of the model's context.

    Args:
        max_new_tokens: The most tokens one request may generate (``--max-new-tokens``); a request asking for more
            is refused, one asking for nothing gets at most this.
        max_num_beams: The most beams a request's ``generation_config`` may ask for (each beam is a sequence).
    """

    max_new_tokens: int = field(default=4096, metadata={"help": "most tokens one request may generate"})
    max_num_beams: int = field(default=4, metadata={"help": "most beams a request's generation_config may ask for"})

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "max_num_beams"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RequestLimits.{name} must be an integer >= 1, got {value!r}")


def _show(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (str, list, dict)) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _fail(name: str, expected: str, value: Any) -> ValueError:
    return ValueError(f"{name} must be {expected}, got {_show(value)}")


def _integer(name: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"
        raise _fail(name, bound, value)
    return value


def _number(name: str, value: Any, low: float, high: float, *, open_low: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or (isinstance(value, float) and not math.isfinite(value)) \
            or value > high or value < low or (open_low and value == low):  # an int of any size compares exactly
        raise _fail(name, f"a number from {low} to {high}" + (f" (not {low})" if open_low else ""), value)
    return float(value)


def _string(name: str, value: Any, *, empty: bool = True) -> str:
    if not isinstance(value, str) or (not empty and not value):
        raise _fail(name, "a string" if empty else "a non-empty string", value)
    return value


def _boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(name, "true or false", value)
    return value


def _object(name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(name, "an object", value)
    return value


def _stop(name: str, value: Any) -> None:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_STOP or \
            not all(isinstance(item, str) and item for item in value):
        raise _fail(name, f"a non-empty string or a list of 1 to {MAX_STOP} of them", value)


def _stream_options(name: str, value: Any) -> None:
    for key, item in _object(name, value).items():
        _boolean(f"{name}.{key}", item)


def _content(name: str, value: Any) -> None:
    """A message's content: a string, or a list of text parts ``{"type": "text", "text": ...}``."""
    if isinstance(value, str):
        return
    if not isinstance(value, list):
        raise _fail(name, "a string or a list of content parts", value)
    for index, part in enumerate(value):
        where = f"{name}[{index}]"
        kind = _object(where, part).get("type")
        if kind not in PART_TYPES:
            raise _fail(f"{where}.type", f"one of {list(PART_TYPES)} (the model reads text only)", kind)
        _string(f"{where}.text", part.get("text"))


def _messages(name: str, value: Any) -> None:
    if not isinstance(value, list) or not value:
        raise _fail(name, "a non-empty list of messages", value)
    for index, message in enumerate(value):
        where = f"{name}[{index}]"
        role = _object(where, message).get("role")
        if role not in ROLES:
            raise _fail(f"{where}.role", f"one of {sorted(ROLES)}", role)
        if message.get("tool_calls") is not None:
            if not isinstance(message["tool_calls"], list) or role != "assistant":
                raise _fail(f"{where}.tool_calls", "a list, on an assistant message", message["tool_calls"])
            for call_index, call in enumerate(message["tool_calls"]):
                function = _object(f"{where}.tool_calls[{call_index}]", call).get("function", call)
                _string(f"{where}.tool_calls[{call_index}].function.name", _object(
                    f"{where}.tool_calls[{call_index}].function", function).get("name"), empty=False)
                arguments = function.get("arguments")
                if isinstance(arguments, str):
                    try:
                        json.loads(arguments)
                    except ValueError:
                        raise _fail(f"{where}.tool_calls[{call_index}].function.arguments", "a JSON object",
                                    arguments) from None
                else:
                    _object(f"{where}.tool_calls[{call_index}].function.arguments", arguments)
            if message.get("content") is None:
                continue
        if "content" not in message:
            raise ValueError(f"{where}.content is missing")
        _content(f"{where}.content", message["content"])


def _responses_input(name: str, value: Any) -> None:
    if isinstance(value, str):
        if not value:
            raise _fail(name, "a non-empty string or list", value)
        return
    if not isinstance(value, list) or not value:
        raise _fail(name, "a non-empty string or list of input items", value)
    if isinstance(value[0], dict) and "role" not in value[0] and "type" in value[0] and \
            value[0]["type"] not in ("message", "reasoning", "function_call", "function_call_output"):
        _content(name, value)  # a flat list of content parts, one user message
        return
    for index, item in enumerate(value):
        where = f"{name}[{index}]"
        kind = _object(where, item).get("type")
        if "role" in item:
            if item["role"] not in ROLES:
                raise _fail(f"{where}.role", f"one of {sorted(ROLES)}", item["role"])
            _content(f"{where}.content", item.get("content", ""))
        elif kind == "function_call":
            for key in ("call_id", "name", "arguments"):
                _string(f"{where}.{key}", item.get(key))
        elif kind == "function_call_output":
            _string(f"{where}.call_id", item.get("call_id"))
            _content(f"{where}.output", item.get("output"))
        elif kind == "reasoning":
            for part_index, part in enumerate(item.get("content") or []):
                _string(f"{where}.content[{part_index}].text", _object(f"{where}.content[{part_index}]", part)
                        .get("text"))
        else:
            raise _fail(f"{where}.type", "message, reasoning, function_call or function_call_output (or a role)",
                        kind)


def _tools(name: str, value: Any) -> None:
    if not isinstance(value, list):
        raise _fail(name, "a list of tools", value)
    for index, tool in enumerate(value):
        where = f"{name}[{index}]"
        _string(f"{where}.type", _object(where, tool).get("type"), empty=False)
        if "function" in tool:
            _string(f"{where}.function.name", _object(f"{where}.function", tool["function"]).get("name"), empty=False)


def _logit_bias(name: str, value: Any) -> None:
    for key, bias in _object(name, value).items():
        if not key.isdigit():
            raise _fail(f"{name} key", "a token id (digits)", key)
        _number(f"{name}[{key}]", bias, -100, 100)


def _frequency_penalty(name: str, value: Any) -> None:
    # transformers makes it repetition_penalty = 1 + frequency_penalty, which must be > 0
    _number(name, value, -1, 2, open_low=True)


def _seed(name: str, value: Any) -> None:
    _integer(name, value, -(2**63), 2**64 - 1)  # what torch.manual_seed takes


Check = Callable[[str, Any], object]
_POSITIVE: Check = partial(_integer, low=1)


def _unsupported(default: Any) -> Check:
    """An OpenAI field transformers ignores: only its default is taken (anything else would be a silent 200)."""
    def check(name: str, value: Any) -> None:
        if value != default or isinstance(value, bool) != isinstance(default, bool):
            raise ValueError(f"{name} is not supported by this server: it must be {json.dumps(default)} or absent, "
                             f"got {_show(value)}")
    return check


# OpenAI fields transformers ignores with a warning, and the one value of each that means what it does anyway
_IGNORED = {"n": _unsupported(1), "presence_penalty": _unsupported(0)}
_COMMON: dict[str, Check] = {
    "model": partial(_string, empty=False), "stream": _boolean, "stream_options": _stream_options, "seed": _seed,
    "temperature": partial(_number, low=0, high=2),
    "top_p": partial(_number, low=0, high=1),
    "generation_config": _string,  # read in check_generation_config
}
FIELDS: dict[str, dict[str, Check]] = {
    COMPLETIONS: {**_COMMON, **_IGNORED, "best_of": _unsupported(1), "echo": _unsupported(False),
                  "logprobs": _unsupported(0), "logit_bias": _unsupported({}),
                  "prompt": _string, "suffix": _string, "max_tokens": _POSITIVE,
                  "frequency_penalty": _frequency_penalty, "stop": _stop},
    CHAT: {**_COMMON, **_IGNORED, "logprobs": _unsupported(False), "top_logprobs": _unsupported(0),
           "response_format": _unsupported({"type": "text"}),
           "messages": _messages, "max_tokens": _POSITIVE, "max_completion_tokens": _POSITIVE,
           "frequency_penalty": _frequency_penalty, "logit_bias": _logit_bias, "stop": _stop, "tools": _tools,
           "chat_template_kwargs": _object},
    RESPONSES: {**_COMMON, "input": _responses_input, "max_output_tokens": _POSITIVE,
                "instructions": _string, "tools": _tools},
}
REQUIRED = {COMPLETIONS: ("model",), CHAT: ("model", "messages"), RESPONSES: ("model", "input")}
LENGTH_FIELDS = {COMPLETIONS: ("max_tokens",), CHAT: ("max_completion_tokens", "max_tokens"),
                 RESPONSES: ("max_output_tokens",)}


# generation_config: the settings a request may choose (generate()'s other keywords are not for clients)
GENERATION_SETTINGS: dict[str, Check] = {
    "max_new_tokens": _POSITIVE, "min_new_tokens": partial(_integer, low=0),
    "max_length": _POSITIVE, "min_length": partial(_integer, low=0),
    "do_sample": _boolean, "temperature": partial(_number, low=0, high=100),
    "top_k": partial(_integer, low=0), "top_p": partial(_number, low=0, high=1),
    "min_p": partial(_number, low=0, high=1),
    "typical_p": partial(_number, low=0, high=1, open_low=True),
    "repetition_penalty": partial(_number, low=0, high=100, open_low=True),
    "no_repeat_ngram_size": partial(_integer, low=0),
    "length_penalty": partial(_number, low=-100, high=100),
    "num_beams": _POSITIVE, "early_stopping": _boolean, "stop_strings": _stop, "seed": _seed,
    "lafn_banks": lambda n, v: None,  # checked by the engine view, which knows the banks loaded
}


def check_generation_config(text: Any, limits: RequestLimits) -> dict[str, Any]:
    """A request's ``generation_config``: a string holding a JSON object of ``GENERATION_SETTINGS``."""
    name = "generation_config"
    _string(name, text)
    try:
        settings = json.loads(text, parse_constant=_no_constant)
    except ValueError as error:
        raise ValueError(f"{name} must be a JSON object (a string), not valid JSON: {error}") from None
    if not isinstance(settings, dict):
        raise _fail(name, "a JSON object of generation settings", settings)
    unknown = sorted(set(settings) - set(GENERATION_SETTINGS))
    if unknown:
        raise ValueError(f"{name} takes only the settings {sorted(GENERATION_SETTINGS)}; got {_show(unknown)}")
    for key, value in settings.items():
        GENERATION_SETTINGS[key](f"{name} {key}", value)
    if settings.get("max_new_tokens", 1) > limits.max_new_tokens:
        raise ValueError(f"{name} max_new_tokens is {settings['max_new_tokens']}, but this server generates at most "
                         f"{limits.max_new_tokens} tokens per request (--max-new-tokens)")
    if settings.get("num_beams", 1) > limits.max_num_beams:
        raise ValueError(f"{name} num_beams is {settings['num_beams']}, more than this server allows "
                         f"({limits.max_num_beams})")
    return settings


def _no_constant(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def check_request(route: str, body: Mapping[str, Any], limits: RequestLimits) -> None:
    """``ValueError`` (a 400) naming the first field of ``body`` that ``route`` (``completions``, ``chat`` or
    ``responses``) cannot take: its type, its range, or, for ``generation_config``, its settings."""
    for name in REQUIRED[route]:
        if name not in body:
            raise ValueError(f"{name} is missing")
    checks = FIELDS[route]
    for name, value in body.items():
        check = checks.get(name)
        if check is None or (value is None and name not in REQUIRED[route]):
            continue  # the fields transformers ignores (with a warning) or refuses (422); null: unset
        check(name, value)
    if body.get("generation_config") is not None:
        check_generation_config(body["generation_config"], limits)


def requested_length_field(route: str, body: Mapping[str, Any]) -> str | None:
    """The field that sets the request's ``max_new_tokens``, as transformers reads them (``None``: none)."""
    for name in LENGTH_FIELDS[route]:
        if body.get(name) is not None:
            return name
    if body.get("generation_config") is not None and "max_new_tokens" in json.loads(body["generation_config"]):
        return "generation_config max_new_tokens"
    return None


def check_logit_bias(kwargs: dict[str, Any], vocab_size: int | None) -> None:
    """transformers makes ``logit_bias`` its ``sequence_bias`` ({(id,): bias}), which takes floats only: the biases
    as floats (in place), and each token id within the model's vocabulary."""
    bias = kwargs.get("sequence_bias")
    if not isinstance(bias, dict):
        return
    for ids in bias:
        if vocab_size is not None and any(token >= vocab_size for token in ids):
            raise ValueError(f"logit_bias token id {ids[0]} is not in the model's vocabulary ({vocab_size} tokens)")
    kwargs["sequence_bias"] = {ids: float(value) for ids, value in bias.items()}


def bound_length(kwargs: dict[str, Any], prompt_length: int, context: int | None, limits: RequestLimits,
                 requested: str | None) -> None:
    """Bound ``kwargs['max_new_tokens']`` (in place) by the room the prompt leaves in ``context`` and by
    ``limits.max_new_tokens``: refused when ``requested`` (the field that set it) asks for more, capped when the
    request asked for nothing; ``min_new_tokens``, ``min_length`` and ``max_length`` checked against the same."""
    room = None if context is None else context - prompt_length
    cap = limits.max_new_tokens if room is None else min(room, limits.max_new_tokens)
    wanted = kwargs.get("max_new_tokens")
    if not isinstance(wanted, int) or wanted < 1:
        wanted = cap
    where = (f"the prompt has {prompt_length} tokens and the model takes at most {context}, prompt and answer, so "
             f"this request may generate at most {room} tokens") if room is not None and room <= limits.max_new_tokens \
        else f"this server generates at most {limits.max_new_tokens} tokens per request (--max-new-tokens)"
    if wanted > cap:
        if requested is not None:
            raise ValueError(f"{requested} is {wanted}, but {where}")
        wanted = cap
    least = kwargs.get("min_new_tokens")
    if isinstance(least, int) and least > cap:
        raise ValueError(f"generation_config min_new_tokens is {least}, but {where}")
    if isinstance(least, int) and least > wanted:
        if requested is not None:
            raise ValueError(f"generation_config min_new_tokens is {least}, more than {requested} ({wanted})")
        wanted = least  # the default length grows to what the request asks at least
    kwargs["max_new_tokens"] = wanted
    total = prompt_length + wanted
    for name in ("min_length", "max_length"):
        value = kwargs.get(name)
        if isinstance(value, int) and value > total and (name == "min_length" or context is not None
                                                         and value > context):
            raise ValueError(f"generation_config {name} is {value}, more than the prompt and the answer can take "
                             f"({prompt_length} + {wanted} tokens; {where})")
