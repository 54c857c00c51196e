"""Schemathesis hooks that sign generated deliveries, so its cases get past ``SC-Signature``.

Load with ``SCHEMATHESIS_HOOKS=tests.schemathesis_hooks`` (the checkout on ``PYTHONPATH``) and
``SMARTCAR_MANAGEMENT_TOKEN`` set to the instance's token (its first entry signs). For every
``POST /webhooks/smartcar`` case:

* an ``SC-Signature`` of a signature's form (64 hex digits, the first form the document gives
  the header) is replaced by the real signature of the body;
* any other value (the document's second form, "read as no signature") is sent as generated,
  and so is a missing header: those cases explore the 401 and the unsigned VERIFY answer.

The signature is computed by a ``requests`` auth hook on the prepared request, which runs after
the body has been serialised: it signs the exact bytes that go on the wire, whatever serializer
Schemathesis picked. It is HMAC-SHA256 written out here rather than imported from ``core``, so
the check does not trust the code under test.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from typing import Any

import requests
import schemathesis

WEBHOOK_PATH = "/webhooks/smartcar"
SIGNATURE_HEADER = "SC-Signature"
#: A signature's form, as the document gives it; a generated value of this form means "sign me".
SIGN_ME = re.compile(r"[0-9a-fA-F]{64}")


def management_token() -> bytes:
    """The first entry of ``SMARTCAR_MANAGEMENT_TOKEN`` (a comma-separated list during rotation)."""
    value = os.environ.get("SMARTCAR_MANAGEMENT_TOKEN", "").split(",")[0].strip()
    if not value:
        raise RuntimeError("set SMARTCAR_MANAGEMENT_TOKEN to the instance's management token to sign deliveries")
    return value.encode()


class SignBody(requests.auth.AuthBase):
    """Writes ``SC-Signature`` over the prepared request's body, when the case asked for a signature."""

    def __init__(self, token: bytes) -> None:
        self.token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        header = request.headers.get(SIGNATURE_HEADER)
        if header is not None and SIGN_ME.fullmatch(header):
            body = request.body or b""
            if isinstance(body, str):
                body = body.encode("utf-8")
            if not isinstance(body, bytes):  # a streamed body cannot be read here without consuming it
                raise TypeError(f"cannot sign a body of type {type(body).__name__}")
            request.headers[SIGNATURE_HEADER] = hmac.new(self.token, body, hashlib.sha256).hexdigest()
        return request


@schemathesis.hook
def before_call(context: schemathesis.HookContext, case: schemathesis.Case, kwargs: dict[str, Any]) -> None:
    """Sign the webhook's cases (the keyword arguments reach ``requests``)."""
    if case.operation.path == WEBHOOK_PATH:
        kwargs["auth"] = SignBody(management_token())
