"""Wire models shared by all endpoints (OpenAI-compatible), and the input-validation layer of requests.

Every JSON request body is a :class:`RequestModel`, so what any endpoint accepts is checked in one way
before a service sees it (a 400 in the error envelope otherwise):

* numbers are strict: `true`/`false` are not numbers, `"1"` is not an integer, `1.5` is not an integer
  (`1.0` is, as in JSON Schema; an integer is a valid float); `NaN` and `Infinity` (which Python's JSON
  parser takes) are refused;
* every string is valid Unicode: a lone UTF-16 surrogate (`"\\ud800"`, valid JSON) cannot reach a
  tokenizer, a file name or a response;
* ids, seeds, token ids and budgets carry their real bounds in the schema (the types below), so
  `/openapi.json` says what the server takes.
"""

from __future__ import annotations

import functools
import re
from typing import Annotated, Any, get_args, get_origin

import httpx
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from experts.repository.store import ID_PATTERN, check_expert_id

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_SURROGATE = re.compile("[\ud800-\udfff]")

def _bearer_safe(v: SecretStr) -> SecretStr:
    if not _HEADER_SAFE.match(v.get_secret_value()):
        raise ValueError("a key must be printable ASCII without spaces (it is sent in an HTTP header)")
    return v


def _parsable_url(v: str) -> str:
    try:
        httpx.URL(v)
    except Exception:  # httpx.InvalidURL, and whatever else an odd host makes the parser raise
        raise ValueError("not a valid http(s) URL") from None
    return v


_HEADER_SAFE = re.compile(r"^[\x21-\x7e]{1,4096}$")
URL_PATTERN = r"^https?://[A-Za-z0-9.\-\[\]:]+(/[\x21-\x7e]*)?$"
# A key the gateway sends in an `Authorization: Bearer` header: printable ASCII, never echoed (SecretStr)
BearerKey = Annotated[SecretStr, AfterValidator(_bearer_safe),
                      WithJsonSchema({"type": "string", "pattern": _HEADER_SAFE.pattern, "writeOnly": True,
                                      "format": "password"})]
# An http(s) URL the gateway calls: ASCII host, no spaces
HttpURL = Annotated[str, Field(pattern=URL_PATTERN, max_length=2048), AfterValidator(_parsable_url)]
# An expert id, checked by the repository's own rule (and its message); the schema states the same pattern
EXPERT_ID_SCHEMA = {"type": "string", "pattern": ID_PATTERN.pattern, "minLength": 1, "maxLength": 128}
_ID_HELP = "An expert id: 1-128 letters, digits, '.', '_', ':', '-', starting with a letter or digit"
ExpertId = Annotated[str, AfterValidator(check_expert_id),
                     WithJsonSchema({**EXPERT_ID_SCHEMA, "description": _ID_HELP})]
# torch.Generator.manual_seed takes [-2**63, 2**64 - 1]; the API takes the signed 64-bit range. Upper bounds are
# exclusive powers of two: exact as doubles, so a client (or a generator) reading the schema as floats gets them right
Seed = Annotated[int, Field(ge=INT64_MIN, lt=2**63, description="A signed 64-bit integer")]
TokenId = Annotated[int, Field(ge=0, lt=2**63)]
Tag = Annotated[str, Field(min_length=1, max_length=128)]


COMBINATION = "invalid_combination"  # the error type (and envelope code) of a rule between fields


def combination_error(message: str) -> PydanticCustomError:
    """The error of a rule between fields, each valid alone (exactly one of a, b; c needs d...): a 400 with
    `code: "invalid_combination"`, which a JSON schema cannot express."""
    return PydanticCustomError(COMBINATION, message)


def _bad_unicode(value: Any, path: str = "") -> str | None:
    """The path of the first string (or key) in `value` holding a lone surrogate, else None."""
    if isinstance(value, str):
        return (path or "value") if _SURROGATE.search(value) else None
    if isinstance(value, dict):
        for k, v in value.items():
            where = f"{path}.{k}" if path else str(k)
            if isinstance(k, str) and _SURROGATE.search(k):
                return (path or "body") + " (a key)"
            found = _bad_unicode(v, where)
            if found:
                return found
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            found = _bad_unicode(v, f"{path}[{i}]")
            if found:
                return found
    return None


def _takes_int(annotation: Any) -> bool:
    """Whether a field's type holds integers and no floats (int, int | None, list[int], tuples of ints...)."""
    found: set[str] = set()

    def visit(t: Any) -> None:
        if t is int:
            found.add("int")
        elif t is float or t is Any or t is dict or get_origin(t) is dict:
            found.add("other")
        for arg in get_args(t):
            visit(arg)

    visit(annotation)
    return found == {"int"}


@functools.cache
def _int_field(cls: type[BaseModel], name: str) -> bool:
    """`_takes_int` of a model's field, once per field (the validator runs for every field of every request)."""
    return _takes_int(cls.model_fields[name].annotation)


def _integral(value: Any) -> Any:
    """JSON Schema's integers include 1.0: integral floats become ints (1.5, NaN, Infinity stay floats, refused)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


class RequestModel(BaseModel):
    """The base of every JSON request body: strict numbers, valid Unicode (see the module docstring)."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _valid_unicode(cls, value: Any, info: ValidationInfo) -> Any:
        where = _bad_unicode(value)
        if where is not None:
            at = "" if where == "value" else f" at {where}"
            raise ValueError(f"text must be valid Unicode: a lone UTF-16 surrogate{at}")
        if info.field_name is not None and _int_field(cls, info.field_name):
            return _integral(value)
        return value

    @model_validator(mode="after")
    def _valid_unicode_extras(self) -> Any:
        if self.model_extra and _bad_unicode(self.model_extra) is not None:
            raise ValueError("text must be valid Unicode: a lone UTF-16 surrogate in an extra field")
        return self


class OpenAIBaseModel(RequestModel):
    """Requests accept and ignore unknown fields, as OpenAI clients send extras (user, metadata...)."""

    model_config = ConfigDict(extra="allow")


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class StreamOptions(RequestModel):
    include_usage: bool = False


def error_responses(*codes: int) -> dict[int | str, dict]:
    """OpenAPI documentation of the error envelope for the given status codes."""
    desc = {400: "Bad request", 401: "Missing or wrong key", 403: "Not allowed with this key", 404: "Not found",
            409: "Conflict", 413: "Body too large", 429: "Rate limited", 502: "Upstream error",
            503: "Unavailable", 504: "Upstream timeout"}
    return {c: {"model": ErrorResponse, "description": desc.get(c, "Error")} for c in codes}
