"""Differential conformance against vLLM's OpenAI server: send one request to two servers, report what differs.

Each request is a `Case`: a route, a JSON body, and the one `feature` it exercises beyond plain greedy decoding
("plain" for none). A difference is a `Difference(key, detail)`: the key is the feature, or for a plain request the
aspect that differs (`text`, `usage`, ...), so one cause keeps one key however often hypothesis reaches it, and
docs/reference/api.md can list each key once. Field-set differences get their own keys (`vllm-fields` for the
fields only vLLM adds, `fields` for anything else), whatever the feature.

Greedy answers (temperature 0, no sampling feature) must agree in text, finish reason, usage and logprobs (values
within LOGPROB_TOL: both run the same float32 weights, on different CPU kernels). Sampled answers draw from different
random generators, so only their structure is compared.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

LOGPROB_TOL = 1e-3
# Fields vLLM adds to OpenAI's objects that mergeserve leaves out (documented under `vllm-fields`).
VLLM_ONLY = frozenset({"stop_reason", "token_ids", "prompt_logprobs", "prompt_token_ids", "routed_experts",
                       "service_tier", "system_fingerprint", "kv_transfer_params", "ec_transfer_params", "metrics",
                       "refusal", "annotations", "audio", "function_call", "reasoning", "prompt_tokens_details",
                       "completion_tokens_details", "tool_calls", "prompt_text", "reasoning_content"})  # fmt: skip
PENALTIES = frozenset({"frequency_penalty", "presence_penalty", "repetition_penalty"})
DOC_SECTION = "## Differences from vLLM's OpenAI server"


@dataclass(frozen=True)
class Difference:
    key: str
    detail: str


@dataclass(frozen=True)
class Case:
    route: str  # "completions" or "chat/completions"
    body: dict[str, Any]
    feature: str = "plain"

    @property
    def sampled(self) -> bool:
        return self.body.get("temperature", 1.0) != 0

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))


@dataclass
class Answer:
    status: int
    body: Any  # the JSON object, or for a stream the list of parsed chunks
    done: bool = False  # a stream ended with `data: [DONE]`


@dataclass
class Recorder:
    """Every difference seen in a run, and how many requests were sent."""

    requests: int = 0
    boots: str = ""  # how long the servers took to boot, for the report
    seen: dict[str, list[tuple[Case, str]]] = field(default_factory=dict)

    def add(self, case: Case, diffs: list[Difference]) -> None:
        for d in diffs:
            self.seen.setdefault(d.key, []).append((case, d.detail))


def send(client: httpx.Client, url: str, case: Case) -> Answer:
    with client.stream("POST", f"{url}/v1/{case.route}", json=case.body) as resp:
        raw = resp.read().decode()
    if resp.status_code != 200 or not case.stream:
        return Answer(resp.status_code, json.loads(raw) if raw.strip() else None)
    chunks, done = [], False
    for line in raw.splitlines():
        if line.startswith("data:"):
            data = line[5:].strip()
            done = done or data == "[DONE]"
            if data != "[DONE]":
                chunks.append(json.loads(data))
    return Answer(200, chunks, done)


def documented_keys(api_md: Path) -> set[str]:
    """The keys listed under DOC_SECTION: bullets starting "- `key`:"."""
    text = api_md.read_text()
    start = text.index(DOC_SECTION) + len(DOC_SECTION)
    end = text.find("\n## ", start)
    return set(re.findall(r"^- `([^`]+)`:", text[start : end if end != -1 else None], flags=re.M))


def compare(case: Case, ref: Answer, ours: Answer) -> list[Difference]:
    """What differs between vLLM's answer `ref` and mergeserve's `ours`."""
    out: list[Difference] = []
    if ref.status // 100 != ours.status // 100:
        return [Difference(case.feature if case.feature != "plain" else "status",
                           f"vLLM {ref.status}, mergeserve {ours.status}: {_error(ours) or _error(ref)}")]  # fmt: skip
    if ref.status != 200:
        return _error_shape(case, ours)
    out += _fields(case, ref.body, ours.body)
    if case.stream:
        out += _stream_shape(case, ref, ours)
        ref_view, our_view = _merge_stream(case, ref.body), _merge_stream(case, ours.body)
    else:
        ref_view, our_view = _view(case, ref.body), _view(case, ours.body)
    out += _structure(case, ref_view, our_view) if case.sampled else _greedy(case, ref_view, our_view)
    return out


def _error(answer: Answer) -> str:
    body = answer.body if isinstance(answer.body, dict) else {}
    return str((body.get("error") or {}).get("message", ""))[:160] if body.get("error") else ""


def _error_shape(case: Case, ours: Answer) -> list[Difference]:
    err = ours.body.get("error") if isinstance(ours.body, dict) else None
    if not isinstance(err, dict) or set(err) != {"message", "type", "param", "code"} or err["code"] != ours.status:
        return [Difference("error-shape", f"mergeserve {ours.status}: {ours.body!r:.200}")]
    return []


def _fields(case: Case, ref: Any, ours: Any, path: str = "") -> list[Difference]:
    """Key sets of every object, recursively (a stream: chunk by chunk, as far as both go)."""
    if isinstance(ref, list) and isinstance(ours, list):
        return [d for r, o in zip(ref, ours, strict=False) for d in _fields(case, r, o, path + "[]")][:1]
    if not (isinstance(ref, dict) and isinstance(ours, dict)):
        return []
    only_ref, only_ours = set(ref) - set(ours), set(ours) - set(ref)
    # top_logprobs maps token texts to logprobs: its keys are data, compared by _logprobs.
    if path.endswith("top_logprobs[]"):
        return []
    out = []
    if only_ref - VLLM_ONLY or only_ours:
        out.append(
            Difference("fields", f"at {path or '.'}: only vLLM {sorted(only_ref)}, only ours {sorted(only_ours)}")
        )
    elif only_ref:
        out.append(Difference("vllm-fields", f"at {path or '.'}: {sorted(only_ref)}"))
    for key in set(ref) & set(ours):
        out += _fields(case, ref[key], ours[key], f"{path}.{key}")
    return _dedup(out)


def _dedup(diffs: list[Difference]) -> list[Difference]:
    seen: dict[str, Difference] = {}
    for d in diffs:
        seen.setdefault(d.key, d)
    return list(seen.values())


def _view(case: Case, body: dict[str, Any]) -> dict[str, Any]:
    """What is compared of a whole answer: choices' text, finish reasons, logprobs; usage."""
    choices = [{"text": c["text"] if case.route == "completions" else c["message"]["content"],
                "finish_reason": c["finish_reason"], "logprobs": c.get("logprobs")}
               for c in body.get("choices", [])]  # fmt: skip
    return {"choices": choices, "usage": body.get("usage")}


def _merge_stream(case: Case, chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """A stream folded into a whole answer's view: texts and logprobs concatenated per choice index."""
    merged: dict[int, dict[str, Any]] = {}
    usage = None
    for chunk in chunks:
        usage = chunk.get("usage") or usage
        for c in chunk.get("choices", []):
            m = merged.setdefault(c["index"], {"text": "", "finish_reason": None, "logprobs": None})
            m["text"] += c["text"] if case.route == "completions" else (c["delta"].get("content") or "")
            m["finish_reason"] = c["finish_reason"] or m["finish_reason"]
            if c.get("logprobs"):
                m["logprobs"] = _concat_logprobs(m["logprobs"], c["logprobs"])
    return {"choices": [merged[i] for i in sorted(merged)], "usage": usage}


def _concat_logprobs(acc: dict[str, Any] | None, part: dict[str, Any]) -> dict[str, Any]:
    if acc is None:
        return {k: list(v) if isinstance(v, list) else v for k, v in part.items()}
    for k, v in part.items():
        if isinstance(v, list):
            acc[k] = (acc.get(k) or []) + v
    return acc


def _stream_shape(case: Case, ref: Answer, ours: Answer) -> list[Difference]:
    """The sequence of chunk kinds: role opening, content, finish, usage; and the closing [DONE]."""
    sig_ref, sig_ours = _signature(case, ref.body), _signature(case, ours.body)
    if (sig_ref, ref.done) == (sig_ours, ours.done):
        return []
    key = case.feature if case.feature != "plain" else "stream"
    return [Difference(key, f"chunks vLLM {sig_ref} done={ref.done}; mergeserve {sig_ours} done={ours.done}")]


def _signature(case: Case, chunks: list[dict[str, Any]]) -> list[str]:
    sig: list[str] = []
    for chunk in chunks:
        if not chunk.get("choices"):
            sig.append("usage" if chunk.get("usage") else "empty")
            continue
        for c in chunk["choices"]:
            kind = "role" if (c.get("delta") or {}).get("role") else "content"
            kind = f"finish:{c['finish_reason']}" if c["finish_reason"] else kind
            # Sampled streams differ in length; consecutive content chunks count as one kind there.
            if not (case.sampled and kind == "content" and sig and sig[-1] == "content"):
                sig.append(kind)
    return sig


def _greedy(case: Case, ref: dict[str, Any], ours: dict[str, Any]) -> list[Difference]:
    diffs: list[tuple[str, str]] = []
    if len(ref["choices"]) != len(ours["choices"]):
        diffs.append(("choices", f"vLLM {len(ref['choices'])} choices, mergeserve {len(ours['choices'])}"))
    for r, o in zip(ref["choices"], ours["choices"], strict=False):
        if r["text"] != o["text"]:
            diffs.append(("text", f"vLLM {r['text']!r:.120}, mergeserve {o['text']!r:.120}"))
        if r["finish_reason"] != o["finish_reason"]:
            diffs.append(("finish_reason", f"vLLM {r['finish_reason']}, mergeserve {o['finish_reason']}"))
        if problem := _logprobs(r["logprobs"], o["logprobs"]):
            diffs.append(("logprobs", problem))
    if ref["usage"] != ours["usage"] and _usage_core(ref["usage"]) != _usage_core(ours["usage"]):
        diffs.append(("usage", f"vLLM {_usage_core(ref['usage'])}, mergeserve {_usage_core(ours['usage'])}"))
    return [Difference(_greedy_key(case, aspect, d), f"{aspect}: {d}") for aspect, d in diffs]


def _greedy_key(case: Case, aspect: str, detail: str) -> str:
    """The feature, except for causes known by their aspect: which logprobs are reported."""
    if aspect == "logprobs" and case.body.get("logprobs") == 0 and "top_logprobs" in detail:
        return "logprobs-0"
    if aspect == "logprobs" and case.feature in PENALTIES:
        return "penalized-logprobs"
    return case.feature if case.feature != "plain" else aspect


def _usage_core(usage: dict[str, Any] | None) -> tuple[Any, ...] | None:
    keys = ("prompt_tokens", "completion_tokens", "total_tokens")
    return None if usage is None else tuple(usage.get(k) for k in keys)


def _structure(case: Case, ref: dict[str, Any], ours: dict[str, Any]) -> list[Difference]:
    """Sampled answers: the same number of choices, finish reasons from OpenAI's set, the same prompt usage."""
    key, out = case.feature if case.feature != "plain" else "sampled", []
    if len(ref["choices"]) != len(ours["choices"]):
        out.append(f"vLLM {len(ref['choices'])} choices, mergeserve {len(ours['choices'])}")
    for c in ours["choices"]:
        if c["finish_reason"] not in ("stop", "length"):
            out.append(f"mergeserve finish_reason {c['finish_reason']!r}")
        if (c["logprobs"] is None) != (ref["choices"][0]["logprobs"] is None):
            out.append("logprobs present on one side only")
    r, o = _usage_core(ref["usage"]), _usage_core(ours["usage"])
    if (r is None) != (o is None) or (r and o and r[0] != o[0]):
        out.append(f"usage vLLM {r}, mergeserve {o}")
    return [Difference(key, d) for d in out]


def _logprobs(ref: Any, ours: Any) -> str | None:
    if ref is None or ours is None:
        return None if ref is ours else f"vLLM {'null' if ref is None else 'given'}, mergeserve " + (
            "null" if ours is None else "given")  # fmt: skip
    r_entries: list[tuple[str, float | None, dict[str, float] | None]]
    o_entries: list[tuple[str, float | None, dict[str, float] | None]]
    if "content" in ref:  # chat: a list of {token, logprob, bytes, top_logprobs}
        r_entries = [(e["token"], e["logprob"], _tops(e["top_logprobs"])) for e in ref["content"] or []]
        o_entries = [(e["token"], e["logprob"], _tops(e["top_logprobs"])) for e in ours.get("content") or []]
    else:
        if ref.get("text_offset") != ours.get("text_offset"):
            return f"text_offset vLLM {ref.get('text_offset')}, mergeserve {ours.get('text_offset')}"
        r_entries = list(zip(ref["tokens"], ref["token_logprobs"], ref["top_logprobs"] or _nones(ref), strict=True))
        o_entries = list(zip(ours["tokens"], ours["token_logprobs"], ours["top_logprobs"] or _nones(ours), strict=True))
    if [e[0] for e in r_entries] != [e[0] for e in o_entries]:
        return f"tokens vLLM {[e[0] for e in r_entries]}, mergeserve {[e[0] for e in o_entries]}"
    for i, ((_, r_lp, r_top), (_, o_lp, o_top)) in enumerate(zip(r_entries, o_entries, strict=True)):
        if not _close(r_lp, o_lp):
            return f"token {i}: logprob vLLM {r_lp}, mergeserve {o_lp}"
        if (r_top is None) != (o_top is None):
            return f"token {i}: top_logprobs vLLM {r_top}, mergeserve {o_top}"
        if r_top is not None and o_top is not None and (problem := _tops_differ(r_top, o_top)):
            return f"token {i}: top_logprobs {problem}"
    return None


def _nones(lp: dict[str, Any]) -> list[Any]:
    return [None] * len(lp["tokens"])


def _tops(entries: list[dict[str, Any]]) -> dict[str, float]:
    return {e["token"]: e["logprob"] for e in entries}


def _close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return a == b or math.isclose(a, b, abs_tol=LOGPROB_TOL)


def _tops_differ(ref: dict[str, float], ours: dict[str, float]) -> str | None:
    """Equal alternatives with close values; a near-tie at the cut-off may pick either token."""
    if len(ref) != len(ours):
        return f"{len(ref)} alternatives vs {len(ours)}"
    floor = min(ref.values(), default=0.0)
    for token in set(ref) ^ set(ours):
        value = ref.get(token, ours.get(token))
        if value is None or not _close(value, floor):
            return f"vLLM {ref}, mergeserve {ours}"
    return next((f"{t!r}: {ref[t]} vs {ours[t]}" for t in set(ref) & set(ours) if not _close(ref[t], ours[t])), None)
