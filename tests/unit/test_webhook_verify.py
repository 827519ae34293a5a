"""README: a receiver verifies the gateway's webhooks with the OpenAI SDK's
``webhooks.verify_signature`` or a Standard Webhooks library (issue 23 item 16)."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime

import openai
import pytest
from standardwebhooks import Webhook

from app.webhooks.sender import signed_headers

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
BODY = json.dumps(
    {
        "object": "event",
        "id": "msg_1",
        "type": "image.task.succeeded",
        "created_at": 1,
        "data": {"id": "task_1"},
    }
).encode()


def test_the_sdk_and_a_standard_webhooks_library_accept_a_signed_event() -> None:
    headers = signed_headers(SECRET, "msg_1", BODY, datetime.now(UTC))
    client = openai.OpenAI(api_key="unused", base_url="http://127.0.0.1:9/v1")
    client.webhooks.verify_signature(BODY, headers, secret=SECRET)  # raises if it does not match
    assert Webhook(SECRET).verify(BODY, headers)["type"] == "image.task.succeeded"
    with pytest.raises(openai.InvalidWebhookSignatureError):
        client.webhooks.verify_signature(BODY.replace(b"task_1", b"task_2"), headers, secret=SECRET)
