"""SC-Signature checking and VERIFY answers."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from core.signatures import answer_challenge, is_token_like, sign, verify_signature

TOKENS = (b"current-token", b"previous-token")
BODY = b'{"eventId":"e1","eventType":"VEHICLE_STATE"}'


def test_sign_is_lowercase_hex_hmac_sha256_of_the_raw_body():
    """The signature is hex(HMAC-SHA256(token, body)), lowercase, with no prefix."""
    expected = hmac.new(b"current-token", BODY, hashlib.sha256).hexdigest()
    assert sign(b"current-token", BODY) == expected
    assert expected == expected.lower()
    assert len(expected) == 64


def test_signature_made_with_any_configured_token_verifies():
    """During rotation a signature made with either token is valid."""
    assert verify_signature(TOKENS, BODY, sign(b"current-token", BODY))
    assert verify_signature(TOKENS, BODY, sign(b"previous-token", BODY))


def test_signature_with_an_unknown_token_or_changed_body_fails():
    """A signature under another key, or over other bytes, is rejected."""
    assert not verify_signature(TOKENS, BODY, sign(b"attacker", BODY))
    assert not verify_signature(TOKENS, BODY + b" ", sign(b"current-token", BODY))


def test_uppercase_hex_and_surrounding_whitespace_are_tolerated():
    """Header case and padding do not matter; the digest does."""
    assert verify_signature(TOKENS, BODY, "  " + sign(b"current-token", BODY).upper() + " ")


@pytest.mark.parametrize(
    "header",
    [None, "", "sha256=" + "0" * 57, "zz" * 32, "0" * 63, "0" * 65, "é" * 64, "\x00" * 64, "0" * 10_000],
)
def test_garbage_headers_are_invalid_not_errors(header):
    """Missing, short, long, non-hex or non-ASCII headers are simply invalid."""
    assert verify_signature(TOKENS, BODY, header) is False


def test_no_tokens_means_nothing_verifies():
    """Without a configured token no signature can be valid."""
    assert not verify_signature((), BODY, sign(b"current-token", BODY))


def test_challenge_answer_hashes_the_challenge_as_received():
    """The VERIFY answer is HMAC-SHA256(token, challenge) in lowercase hex."""
    expected = hmac.new(b"current-token", b"3f1c9a-random-token", hashlib.sha256).hexdigest()
    assert answer_challenge(b"current-token", "3f1c9a-random-token") == expected


@pytest.mark.parametrize("challenge", ["3f1c9a-random-token", "a", "A.b_c~d-9", "x" * 256])
def test_token_like_challenges(challenge):
    """Short challenges made of URL-safe characters are token-like."""
    assert is_token_like(challenge)


@pytest.mark.parametrize("challenge", ["", "x" * 257, '{"eventId":"x"}', "a b", "a\nb", "ä", "a/b"])
def test_challenges_that_could_be_a_body_are_not_token_like(challenge):
    """Braces, quotes, spaces, long or non-ASCII challenges are not token-like."""
    assert not is_token_like(challenge)
