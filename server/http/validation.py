"""TGI's request validation: the same rules, in the same order, with the same messages.

Every failure raises `InputValidationError`, which the app turns into
422 {"error": "Input validation error: ...", "error_type": "validation"}.
"""

from __future__ import annotations

from collections.abc import Callable

from server.config.schema import LimitsConfig
from server.engine.sampling import SamplingParams
from server.engine.token_floor import TokenFloor
from server.engine.types import PreparedRequest
from server.http.tgi_protocol import Parameters


class InputValidationError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(f"Input validation error: {message}")


def _check_ranges(p: Parameters, limits: LimitsConfig, served_adapter: str) -> None:
    if p.best_of is not None and p.best_of != 1:
        raise InputValidationError("`best_of` != 1 is not allowed for this endpoint")
    if p.temperature is not None and p.temperature <= 0:
        raise InputValidationError("`temperature` must be strictly positive")
    if p.repetition_penalty is not None and p.repetition_penalty <= 0:
        raise InputValidationError("`repetition_penalty` must be strictly positive")
    if p.frequency_penalty is not None and not -2.0 <= p.frequency_penalty <= 2.0:
        raise InputValidationError("`frequency_penalty` must be >= -2.0 and <= 2.0")
    if p.top_p is not None and not 0.0 < p.top_p < 1.0:
        raise InputValidationError("`top_p` must be > 0.0 and < 1.0")
    if p.typical_p is not None and not 0.0 < p.typical_p < 1.0:
        raise InputValidationError("`typical_p` must be > 0.0 and < 1.0")
    if p.top_k is not None and p.top_k <= 0:
        raise InputValidationError("`top_k` must be strictly positive")
    if p.max_new_tokens is not None and p.max_new_tokens <= 0:
        raise InputValidationError("`max_new_tokens` must be strictly positive")
    if len(p.stop) > limits.max_stop_sequences:
        raise InputValidationError(
            f"`stop` supports up to {limits.max_stop_sequences} stop sequences. Given: {len(p.stop)}"
        )
    # Features we do not implement are refused by name rather than ignored.
    if p.top_n_tokens:
        raise InputValidationError("`top_n_tokens` is not supported by this server; leave it unset")
    if p.watermark:
        raise InputValidationError("`watermark` is not supported by this server; leave it false")
    if p.grammar is not None:
        raise InputValidationError("`grammar` is not supported by this server; leave it unset")
    if p.decoder_input_details:
        raise InputValidationError("`decoder_input_details` is not supported by this server; leave it false")
    if p.adapter_id is not None and p.adapter_id != served_adapter:
        raise InputValidationError(
            f"`adapter_id` '{p.adapter_id}' is not served; this server serves the fixed adapter set "
            f"'{served_adapter}' (see /info); omit `adapter_id`"
        )


def _check_text(inputs: str, p: Parameters, limits: LimitsConfig, floor: TokenFloor | None) -> None:
    if not inputs:
        raise InputValidationError("`inputs` cannot be empty")
    if p.truncate is None and floor is not None and (least := floor.tokens(inputs)) > limits.max_input_tokens:
        # Certainly too long: refused without spending seconds tokenizing a huge body.
        raise InputValidationError(
            f"`inputs` must have less than {limits.max_input_tokens} tokens. "
            f"Given: at least {least} ({len(inputs)} characters)"
        )
    if not inputs.isascii():
        # JSON's "\ud800" escape decodes to a lone surrogate, which no tokenizer takes.
        try:
            inputs.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InputValidationError(f"`inputs` is not valid Unicode (lone surrogate at {exc.start})") from None


def validate(
    inputs: str,
    p: Parameters,
    tokenize: Callable[[str], list[int]],
    limits: LimitsConfig,
    served_adapter: str,
    floor: TokenFloor | None = None,
) -> PreparedRequest:
    """Blocking (it tokenizes, seconds for a 1 MiB body): the routes run it in a worker thread."""
    _check_ranges(p, limits, served_adapter)
    _check_text(inputs, p, limits, floor)
    ids = tokenize(inputs)
    if p.truncate is not None:
        if not 0 < p.truncate <= limits.max_input_tokens:
            raise InputValidationError(
                f"`truncate` must be strictly positive and less than {limits.max_input_tokens}. Given: {p.truncate}"
            )
        ids = ids[-p.truncate :]
    if not ids:
        # A prompt of zero tokens has no last position to predict from: batched, its logits would be read at some
        # other request's position (a leak of that request's next-token distribution), so it is refused here.
        raise InputValidationError(
            "`inputs` tokenizes to no tokens (the tokenizer drops every character given); send at least one token"
        )
    if len(ids) > limits.max_input_tokens:
        raise InputValidationError(f"`inputs` must have less than {limits.max_input_tokens} tokens. Given: {len(ids)}")
    room = limits.max_total_tokens - len(ids)
    # An explicit value is checked as given; the default is clipped to the room left, as TGI's null default is.
    max_new = p.max_new_tokens if p.max_new_tokens is not None else min(limits.max_new_tokens or room, room)
    if len(ids) + max_new > limits.max_total_tokens:
        raise InputValidationError(
            f"`inputs` tokens + `max_new_tokens` must be <= {limits.max_total_tokens}. "
            f"Given: {len(ids)} `inputs` tokens and {max_new} `max_new_tokens`"
        )
    params = SamplingParams(
        do_sample=p.do_sample,
        temperature=p.temperature,
        top_k=p.top_k,
        top_p=p.top_p,
        typical_p=p.typical_p,
        repetition_penalty=p.repetition_penalty,
        frequency_penalty=p.frequency_penalty,
        seed=p.seed,
    )
    return PreparedRequest(input_ids=ids, params=params, max_new_tokens=max_new, stop=list(p.stop))
