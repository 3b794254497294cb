"""Who may call the API: Bearer keys compared in constant time, and what is exposed beyond loopback.

Keys are compared as SHA-256 digests with `hmac.compare_digest`, so neither a key's content nor its length shows in
the answer time. /metrics answers without a key unless `security.metrics_need_key`, as TGI's and vLLM's do (scrapers
rarely carry one); `exposure_notices` names what is open when the server listens beyond loopback, for the startup log.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress


class KeyChecker:
    """Answers whether an Authorization header carries one of the keys, in time independent of the keys."""

    def __init__(self, keys: list[str]) -> None:
        self.digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self.digests)

    def allows(self, authorization: str | None) -> bool:
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return False
        digest = hashlib.sha256(given.strip().encode()).digest()
        # Compare against every key (no early exit), so the time does not tell which key came close.
        matches = [hmac.compare_digest(digest, known) for known in self.digests]
        return any(matches)


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach `host`; a hostname other than localhost counts as reachable."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_notices(keys_enabled: bool, metrics_need_key: bool, host: str, port: int) -> list[str]:
    """What answers without a key to anyone who can reach host:port; [] on loopback or when nothing is open."""
    if is_loopback(host):
        return []
    where = f"{host}:{port}"
    if not keys_enabled:
        return [
            f"no API keys: every route answers anyone who can reach {where}; "
            "set security.api_keys_env or security.api_keys_file to require a key"
        ]
    if not metrics_need_key:
        return [
            f"/metrics answers without an API key on {where} (as TGI's does); "
            "set security.metrics_need_key: true to require the key there too"
        ]
    return []
