"""Issue 23 item 11: the error scrubber masks every key shape and every configured secret.

On 9a64885 ``sanitize`` masked ``sk-`` tokens and the upstream's own key, base URL and host only:
Azure's hex keys, Google's ``AIza…`` keys, BFL's UUID keys, webhook secrets, masked fragments of a
key (``abcd****wxyz``), and other configured secrets (another upstream's key, the admin key) went
through to the client.
"""

from __future__ import annotations

import pytest

from app.upstream.errors import sanitize

AZURE_KEY = "3f1c9e0a7b6d4c2e8f5a1b0c9d8e7f6a"
GOOGLE_KEY = "AIzaSyD-9tSrke72PouQMnMX-a7eZSW0jkFMBWY"
BFL_KEY = "5b3c1d2e-8f9a-4b6c-9d0e-1f2a3b4c5d6e"
STABILITY_KEY = "sk-" + "Zq8" * 16
ADMIN_KEY = "gw-admin-Rk2p9QwLm4Xs7Vb1Nc8Zt5Yh3Jd6"
OTHER_UPSTREAM_KEY = "plainkey-Hq7Wm2Ls9Pz4Xc"
WEBHOOK_SECRET = "whsec_MfKQ9r8GKYqXRjMUJm3bJL7qkkA9mvVj"
CONFIGURED = (ADMIN_KEY, OTHER_UPSTREAM_KEY)

CASES = [
    # (what, message, what must not survive)
    ("azure hex key", f"Access denied: key {AZURE_KEY} is invalid.", [AZURE_KEY]),
    ("azure key upper case", f"key={AZURE_KEY.upper()}", [AZURE_KEY.upper()]),
    ("google key", f"API key not valid. Please pass a valid API key. ({GOOGLE_KEY})", [GOOGLE_KEY]),
    ("google key fragment", "API key AIzaSyD-9t… not valid", ["AIzaSyD-9t"]),
    ("google masked", "key AIza****MBWY was rejected", ["AIza****MBWY", "MBWY was"]),
    ("bfl uuid key", f"Invalid x-key {BFL_KEY}", [BFL_KEY]),
    ("stability sk key", f"Invalid API key: {STABILITY_KEY}", [STABILITY_KEY, "Zq8Zq8"]),
    ("stability masked", "Invalid API key sk-Zq8Z****Zq8", ["Zq8Z"]),
    ("webhook secret", f"signature with {WEBHOOK_SECRET} failed", [WEBHOOK_SECRET, "MfKQ9r"]),
    ("masked hex fragment", "Incorrect key provided: 3f1c****7f6a.", ["3f1c****7f6a"]),
    ("configured secret whole", f"token {ADMIN_KEY} refused", [ADMIN_KEY]),
    ("configured secret part", "token Rk2p9QwLm4Xs refused", ["Rk2p9QwLm4Xs"]),
    ("configured secret masked", "key gw-a****Yh3Jd6 refused", ["Yh3Jd6"]),
    ("another upstream's key", f"bad key {OTHER_UPSTREAM_KEY}", [OTHER_UPSTREAM_KEY]),
    ("another upstream's key, cut", "bad key plainkey-Hq7W", ["plainkey-Hq7W"]),
]


@pytest.mark.parametrize(("what", "message", "gone"), CASES, ids=[c[0] for c in CASES])
def test_masked(what: str, message: str, gone: list[str]) -> None:
    cleaned = sanitize(message, secrets=CONFIGURED)
    for piece in gone:
        assert piece not in cleaned, (what, cleaned)
    assert "redacted" in cleaned or "***" in cleaned, (what, cleaned)


@pytest.mark.parametrize(
    "message",
    [
        "Your request was rejected as a result of our safety system.",
        "Invalid value for 'size': must be one of 1024x1024, 1536x1024.",
        "Rate limit reached for gpt-image-1.5 in organization on images per min: Limit 5.",
        "task-1 failed: disk-full, retry in 20s",
    ],
)
def test_ordinary_messages_are_kept(message: str) -> None:
    assert sanitize(message, secrets=CONFIGURED) == message
