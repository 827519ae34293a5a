"""A real S3-compatible HTTP server on 127.0.0.1: moto's S3, plus the presigned-URL checks moto lacks.

    with FakeS3() as s3:
        store = S3ImageStore(s3.settings(bucket="images"))

moto answers the S3 API (buckets, objects, listing, batch delete) but serves a presigned GET whatever
its ``X-Amz-Signature`` or ``X-Amz-Expires`` say (moto 5.2.5: expired and tampered links both get
200). Tests of signed links need a server that refuses them, so a WSGI layer in front of moto checks
every request that carries SigV4 query parameters, as S3 and MinIO do: unknown key → 403
``InvalidAccessKeyId``, past expiry → 403 ``AccessDenied`` "Request has expired", wrong signature →
403 ``SignatureDoesNotMatch``. The signature is recomputed with botocore's own SigV4 signer, so the
check is the algorithm clients sign with rather than a second hand-written copy of it.

``clock_offset_s`` moves the server's clock forward: a test expires a link by advancing it instead of
sleeping through the TTL. ``ThreadedMotoServer`` is not used because it offers no way to wrap its WSGI
app; this class runs the same moto app and request handler on werkzeug the same way it does.
"""

from __future__ import annotations

import calendar
import hmac
import threading
import time
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qs

from botocore.auth import S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import BaseWSGIServer, make_server

from app.storage.config import StorageSettings

ACCESS_KEY_ID = "AKIAFAKES3TESTKEY01"
SECRET_ACCESS_KEY = "fake-s3-secret-access-key-for-tests-only"
REGION = "us-east-1"
_MAX_EXPIRES_S = 7 * 24 * 3600

StartResponse = Callable[[str, list[tuple[str, str]]], Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class _QuietHandler(MotoRequestHandler):
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        return None


class PresignCheck:
    """WSGI middleware: verify SigV4 query authentication (presigned URLs) before moto sees it."""

    def __init__(self, app: WSGIApp, credentials: dict[str, str], clock: Callable[[], float]) -> None:
        self.app = app
        self.credentials = credentials
        self.clock = clock
        self.refused = 0
        # moto picks its backend from the Host header; requests that arrive under another name (a
        # "public" endpoint in tests) are routed as if sent to the server's own address.
        self.route_host: str | None = None

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        query = environ.get("QUERY_STRING", "")
        # Header-signed API calls (boto's own) go straight through: moto accepts those itself.
        if "X-Amz-" in query and "HTTP_AUTHORIZATION" not in environ:
            failure = self._check(environ, query)
            if failure is not None:
                self.refused += 1
                status, code, message = failure
                body = f"<Error><Code>{code}</Code><Message>{message}</Message></Error>".encode()
                start_response(
                    status, [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))]
                )
                return [body]
        if self.route_host is not None:
            environ["HTTP_HOST"] = self.route_host
        return self.app(environ, start_response)

    def _check(self, environ: dict[str, Any], query: str) -> tuple[str, str, str] | None:
        params = {k: v[0] for k, v in parse_qs(query, keep_blank_values=True).items()}
        needed = ("X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date", "X-Amz-Expires", "X-Amz-Signature")
        if any(name not in params for name in needed) or params["X-Amz-Algorithm"] != "AWS4-HMAC-SHA256":
            return "400 Bad Request", "AuthorizationQueryParametersError", "Incomplete SigV4 query"
        scope = params["X-Amz-Credential"].split("/")
        if len(scope) != 5 or scope[0] not in self.credentials:
            return "403 Forbidden", "InvalidAccessKeyId", "The access key does not exist"
        try:
            signed_at = calendar.timegm(time.strptime(params["X-Amz-Date"], "%Y%m%dT%H%M%SZ"))
            expires = int(params["X-Amz-Expires"])
        except ValueError:
            return "400 Bad Request", "AuthorizationQueryParametersError", "Bad X-Amz-Date or X-Amz-Expires"
        if not 1 <= expires <= _MAX_EXPIRES_S:
            return "400 Bad Request", "AuthorizationQueryParametersError", "X-Amz-Expires out of range"
        if self.clock() > signed_at + expires:
            return "403 Forbidden", "AccessDenied", "Request has expired"
        expected = self._signature(environ, query, params, scope).encode()
        if not hmac.compare_digest(expected, params["X-Amz-Signature"].encode()):
            return "403 Forbidden", "SignatureDoesNotMatch", "The request signature does not match"
        return None

    def _signature(
        self, environ: dict[str, Any], query: str, params: dict[str, str], scope: list[str]
    ) -> str:
        # Rebuild the request exactly as sent (raw path, raw query minus the signature, the signed
        # headers only) and let botocore compute what the signature should be.
        raw_path = environ.get("RAW_URI", environ.get("PATH_INFO", "/")).split("?", 1)[0]
        unsigned = "&".join(p for p in query.split("&") if not p.startswith("X-Amz-Signature="))
        headers = {
            name: environ.get("HTTP_" + name.upper().replace("-", "_"), "")
            for name in params.get("X-Amz-SignedHeaders", "host").split(";")
        }
        request = AWSRequest(
            method=environ["REQUEST_METHOD"], url=f"http://{headers.get('host', '')}{raw_path}?{unsigned}"
        )
        for name, value in headers.items():
            request.headers[name] = value
        request.context["timestamp"] = params["X-Amz-Date"]
        access_key, region, service = scope[0], scope[2], scope[3]
        signer = S3SigV4QueryAuth(Credentials(access_key, self.credentials[access_key]), service, region)
        canonical = signer.canonical_request(request)
        return str(signer.signature(signer.string_to_sign(request, canonical), request))


class FakeS3:
    """moto S3 behind ``PresignCheck`` on a werkzeug server in a daemon thread, on an OS-chosen port."""

    def __init__(self, *, host: str = "127.0.0.1") -> None:
        self.host = host
        self.clock_offset_s = 0.0
        self.check = PresignCheck(
            DomainDispatcherApplication(create_backend_app),
            {ACCESS_KEY_ID: SECRET_ACCESS_KEY},
            clock=lambda: time.time() + self.clock_offset_s,
        )
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        self._server = make_server(self.host, 0, self.check, threaded=True, request_handler=_QuietHandler)
        self.check.route_host = f"{self.host}:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-s3", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = self._thread = None

    @property
    def endpoint_url(self) -> str:
        assert self._server is not None, "start() first"
        return f"http://{self.host}:{self._server.server_port}"

    def settings(self, **overrides: Any) -> StorageSettings:
        """Storage settings pointing at this server with its credentials (never ~/.aws or env)."""
        fields: dict[str, Any] = {
            "kind": "s3",
            "endpoint_url": self.endpoint_url,
            "region": REGION,
            "access_key_id": ACCESS_KEY_ID,
            "secret_access_key": SECRET_ACCESS_KEY,
            "bucket": "images",
            "create_bucket": True,
        }
        fields.update(overrides)
        return StorageSettings.model_validate(fields)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
