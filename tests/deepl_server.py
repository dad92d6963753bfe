"""A stand-in for the DeepL API v2 on 127.0.0.1 (pytest-httpserver): the part the `deepl` client
uses for text (POST /v2/translate with a JSON body, GET /v2/usage), DeepL's limits (50 texts and
128 KiB a request, 413 and 400 beyond them), and scripted faults: statuses to answer the next
requests with (429, 503), a character quota (456 once a request would pass it), a rejected key (403).

A translation is "<target>[/<formality>]: <text>", so a test can tell which settings produced it.
Every answered request is recorded with its texts and settings; a refused one is not (nothing billed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

MAX_TEXTS = 50
MAX_BODY = 128 * 1024
QUOTA_EXCEEDED = 456


@dataclass
class Translated:
    """One answered POST /v2/translate: its texts, settings (every body field but `text`) and size."""

    texts: list[str]
    settings: dict
    body_bytes: int


@dataclass
class FakeDeepL:
    key: str = "test-key"  # the only key accepted (anything else: 403)
    quota: int | None = None  # characters this billing period (None: unlimited)
    faults: list[int] = field(default_factory=list)  # statuses for the next translate requests
    used: int = 0  # characters billed so far
    answered: list[Translated] = field(default_factory=list)
    refused: list[int] = field(default_factory=list)  # the status of each refused request

    def __post_init__(self) -> None:
        self.server = HTTPServer(host="127.0.0.1", port=0)
        self.server.expect_request("/v2/translate", method="POST").respond_with_handler(self._translate)
        self.server.expect_request("/v2/usage").respond_with_handler(self._usage)

    def __enter__(self) -> FakeDeepL:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop()
        self.server.check_handler_errors()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    @property
    def texts(self) -> list[str]:
        """Every text translated (and billed), in order."""
        return [t for request in self.answered for t in request.texts]

    def billed(self) -> int:
        return sum(len(t) for t in self.texts)

    def _refuse(self, status: int, message: str) -> Response:
        self.refused.append(status)
        return _json({"message": message}, status)

    def _translate(self, request: Request) -> Response:
        if request.headers.get("Authorization") != f"DeepL-Auth-Key {self.key}":
            return self._refuse(403, "Wrong endpoint or key")
        if self.faults:
            return self._refuse(self.faults.pop(0), "a scripted fault")
        if len(request.get_data()) > MAX_BODY:
            return self._refuse(413, "Request Entity Too Large")
        body = request.get_json()
        texts, settings = body["text"], {k: v for k, v in body.items() if k != "text"}
        if not texts or len(texts) > MAX_TEXTS:
            return self._refuse(400, f"{len(texts)} texts: 1 to {MAX_TEXTS} a request")
        chars = sum(len(t) for t in texts)  # DeepL bills Unicode code points
        if self.quota is not None and self.used + chars > self.quota:
            return self._refuse(QUOTA_EXCEEDED, "Quota exceeded")
        self.used += chars
        self.answered.append(Translated(texts, settings, len(request.get_data())))
        label = "/".join(filter(None, [settings["target_lang"], settings.get("formality")]))
        translations = [
            {"detected_source_language": "EN", "text": f"{label}: {t}", "billed_characters": len(t)}
            for t in texts
        ]
        return _json({"translations": translations}, 200)

    def _usage(self, request: Request) -> Response:
        if request.headers.get("Authorization") != f"DeepL-Auth-Key {self.key}":
            return _json({"message": "Wrong endpoint or key"}, 403)
        limit = self.quota if self.quota is not None else 10**12
        return _json({"character_count": self.used, "character_limit": limit}, 200)


def _json(data: dict, status: int) -> Response:
    return Response(json.dumps(data, ensure_ascii=False), status=status, content_type="application/json")
