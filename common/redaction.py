"""Secrets out of what is logged or shown: the one place that decides how a secret is hidden."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

HIDDEN = "***"


def redact(text: str, secret: str | None) -> str:
    """`text` with every occurrence of `secret` (a password, an API key) replaced by `***`, should
    a driver or a server ever echo it; `text` as it is when there is no secret."""
    return text.replace(secret, HIDDEN) if secret else text


def redact_url(url: str) -> str:
    """Hide the password of a URL (`postgresql://user:secret@host` -> `user:***@host`)."""
    parts = urlsplit(url)
    if not parts.password:  # none, or empty (`user:@host`): nothing to hide
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = f"{parts.username or ''}:{HIDDEN}"
    return urlunsplit(parts._replace(netloc=f"{user}@{netloc[-1]}"))


def redact_password(text: str, url: str) -> str:
    """`text` with the password of `url` (a database URL) hidden."""
    return redact(text, urlsplit(url).password)
