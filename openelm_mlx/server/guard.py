"""What a server on loopback must refuse before any route runs: foreign Host names (DNS
rebinding), cross-site browser requests, and the headers every answer carries.

A web page the user visits can make the browser send requests to ``http://127.0.0.1:8080``:
either under its own name resolved to 127.0.0.1 (DNS rebinding: the Host header then names the
attacker's domain) or cross-site as a "simple" POST the browser sends without a preflight (the
Origin header then names the page's site). Both are refused here unless the operator widened the
lists with ``--allowed-hosts`` / ``--cors-origins``.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
WILDCARD_HOSTS = ("", "0.0.0.0", "::")

# On every answer: no MIME sniffing of JSON into HTML, no Referer leaking the page's address.
COMMON_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]


@dataclass
class Policy:
    """Host names and browser origins the server answers. ``bound`` is the address it listens on
    (its own name is always allowed; a wildcard bind allows any Host, as the operator chose to
    serve the network)."""

    allowed_hosts: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    bound: str = "127.0.0.1"
    hosts: set[str] = field(init=False)

    def __post_init__(self) -> None:
        self.hosts = {h.lower().strip("[]") for h in (*LOOPBACK_HOSTS, self.bound, *self.allowed_hosts)}
        self.cors_origins = tuple(o.rstrip("/").lower() for o in self.cors_origins)

    def host_allowed(self, host_header: str | None) -> bool:
        if "*" in self.allowed_hosts or self.bound in WILDCARD_HOSTS:
            return True
        if not host_header:
            return False  # HTTP/1.1 requires Host; a request without one is not a browser's
        return _hostname(host_header) in self.hosts

    def origin_allowed(self, origin: str, host_header: str | None) -> bool:
        """Same-origin (the page this server serves) or an origin the operator named."""
        origin = origin.rstrip("/").lower()
        if "*" in self.cors_origins or origin in self.cors_origins:
            return True
        scheme, _, rest = origin.partition("://")
        return scheme in ("http", "https") and host_header is not None and rest == host_header.lower()

    def cors_headers(self, origin: str) -> list[tuple[bytes, bytes]]:
        """The CORS answer for an origin the operator named (never for same-origin requests,
        which need none)."""
        if origin.rstrip("/").lower() not in self.cors_origins and "*" not in self.cors_origins:
            return []
        return [
            (b"access-control-allow-origin", origin.encode("latin-1")),
            (b"vary", b"Origin"),
            (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
            (b"access-control-allow-headers", b"authorization, content-type"),
            (b"access-control-max-age", b"600"),
        ]


def _hostname(host_header: str) -> str:
    """``Host: name:port`` or ``[::1]:port`` -> the lower-case name."""
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[1 : h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def header(scope: dict, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


def page_headers(index: Path) -> dict[str, str]:
    """Content-Security-Policy for the chat page: its one inline script and style allowed by
    their hashes (computed from the file as served, so an edit of the page cannot silently
    break it), requests to this server only, and no framing (clickjacking)."""
    text = index.read_text(encoding="utf-8")
    scripts = " ".join(_hashes(text, "script")) or "'none'"
    styles = " ".join(_hashes(text, "style")) or "'none'"
    csp = (
        f"default-src 'none'; script-src {scripts}; style-src {styles}; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return {"Content-Security-Policy": csp, "X-Frame-Options": "DENY"}


def _hashes(text: str, tag: str) -> list[str]:
    out = []
    for body in re.findall(rf"<{tag}>(.*?)</{tag}>", text, flags=re.S):
        digest = base64.b64encode(hashlib.sha256(body.encode("utf-8")).digest()).decode()
        out.append(f"'sha256-{digest}'")
    return out
