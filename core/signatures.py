"""``SC-Signature`` (hex HMAC-SHA256 of the raw body under any configured token) and VERIFY answers
(under the first); why unsigned challenges are limited: docs/security.md."""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Sequence

import pydantic_core

_HEX_DIGEST_LENGTH = 64  # SHA-256 in hex
# No braces, quotes or spaces: such a challenge cannot be a JSON object (see is_token_like).
_TOKEN_LIKE_CHALLENGE = re.compile(r"[A-Za-z0-9._~-]{1,256}")


def sign(token: bytes, message: bytes) -> str:
    return hmac.new(token, message, hashlib.sha256).hexdigest()


def verify_signature(tokens: Sequence[bytes], body: bytes, header: str | None) -> bool:
    """Never raises: a missing, wrongly sized or non-hex header is simply invalid (either case, blanks
    around it), and one that cannot match costs no HMAC of the body."""
    candidate = (header or "").strip()
    if len(candidate) != _HEX_DIGEST_LENGTH or not candidate.isascii():
        return False
    try:
        expected = bytes.fromhex(candidate)
    except ValueError:
        return False
    valid = False
    for token in tokens:
        # No early exit: timing does not reveal which token matched.
        valid |= hmac.compare_digest(hmac.digest(token, body, "sha256"), expected)
    return valid


def is_token_like(challenge: str) -> bool:
    """Whether an unsigned VERIFY challenge is token-like and not JSON at all (its HMAC would sign that body)."""
    if _TOKEN_LIKE_CHALLENGE.fullmatch(challenge) is None:
        return False
    try:  # the edge's parser in its most permissive setting (NaN too): anything it could ever read
        pydantic_core.from_json(challenge)
    except ValueError:
        return True
    return False


def answer_challenge(token: bytes, challenge: str) -> str:
    """The VERIFY answer: lowercase hex HMAC-SHA256 of the challenge exactly as received."""
    return sign(token, challenge.encode("utf-8"))
