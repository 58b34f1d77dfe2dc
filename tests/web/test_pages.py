"""The pages and static files over HTTP: security headers, no inline code, caching, 404s, and
the files being part of the package."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest
import requests

from tokenwire.testing import GatewayServer
from tokenwire.web.site import CONTENT_SECURITY_POLICY, PAGES, load_site

WEB_DIR = Path(__file__).resolve().parents[2] / "src" / "tokenwire" / "web"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    with GatewayServer(tmp_path_factory.mktemp("pages")) as server:
        yield server


class Markup(HTMLParser):
    """The tags, attributes and inline code of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.inline_code: list[str] = []
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag in ("script", "style"):
            self._in = tag

    def handle_endtag(self, tag: str) -> None:
        self._in = None

    def handle_data(self, data: str) -> None:
        if self._in and data.strip():
            self.inline_code.append(f"<{self._in}> {data.strip()[:40]}")


@pytest.mark.parametrize("path", [page.path for page in PAGES])
def test_pages_carry_a_strict_policy_and_no_inline_code(gateway: GatewayServer, path: str) -> None:
    """Each page has the strict CSP, nosniff, no-referrer and frame denial, and holds no inline script, style or handler."""
    response = requests.get(gateway.base_url + path, timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    policy = dict(part.strip().split(" ", 1) for part in CONTENT_SECURITY_POLICY.split(";"))
    assert policy["script-src"] == "'self'" and policy["default-src"] == "'none'"
    assert policy["frame-ancestors"] == "'none'" and policy["form-action"] == "'none'"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["x-frame-options"] == "DENY"
    assert "set-cookie" not in response.headers
    markup = Markup()
    markup.feed(response.text)
    assert markup.inline_code == []
    scripts = [attrs for tag, attrs in markup.tags if tag == "script"]
    assert scripts and all((a.get("src") or "").startswith("/static/") for a in scripts)
    for tag, attrs in markup.tags:
        assert "style" not in attrs, tag
        assert not [name for name in attrs if name.startswith("on")], tag
        if tag in ("link", "script", "img"):
            assert (attrs.get("href") or attrs.get("src") or "").startswith("/static/"), attrs
    current = [attrs for tag, attrs in markup.tags if attrs.get("aria-current") == "page"]
    assert [a["href"] for a in current] == [path]
    key_inputs = [attrs for tag, attrs in markup.tags if attrs.get("id") == "key-input"]
    assert key_inputs == [key_inputs[0]] and "name" not in key_inputs[0]  # never submitted


def test_static_files_are_served_with_their_types_and_revalidated(gateway: GatewayServer) -> None:
    """Modules, the stylesheet and the icon have their media types, the same headers, and a 304 for a known ETag."""
    for name, media_type in [
        ("tokenwire.js", "text/javascript; charset=utf-8"),
        ("style.css", "text/css; charset=utf-8"),
        ("favicon.svg", "image/svg+xml"),
    ]:
        response = requests.get(f"{gateway.base_url}/static/{name}", timeout=10)
        assert response.status_code == 200, name
        assert response.headers["content-type"] == media_type
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["cache-control"] == "no-cache"
        etag = response.headers["etag"]
        again = requests.get(
            f"{gateway.base_url}/static/{name}", headers={"If-None-Match": etag}, timeout=10
        )
        assert again.status_code == 304 and again.content == b""
        assert again.headers["etag"] == etag
    head = requests.head(gateway.base_url + "/", timeout=10)
    assert head.status_code == 200 and head.content == b""


@pytest.mark.parametrize(
    "path",
    [
        "/static/missing.js",
        "/static/..%2Fsite.py",
        "/static/%2E%2E/site.py",
        "/static/../web/site.py",
        "/static/",
        "/playground",
    ],
)
def test_unknown_files_are_404_and_nothing_else_is_read(gateway: GatewayServer, path: str) -> None:
    """Only the files of static/ are served: other names, traversal attempts and other paths are 404."""
    response = requests.get(gateway.base_url + path, timeout=10)
    assert response.status_code == 404
    assert "import" not in response.text


def test_every_module_a_page_imports_is_served() -> None:
    """Each ES module import and page script names a file of static/ (the pages need no build step)."""
    pages, files = load_site()
    for name, asset in files.items():
        if name.endswith(".js"):
            for target in re.findall(r'from "\./([\w.-]+)"', asset.body.decode()):
                assert target in files, (name, target)
    for path, asset in pages.items():
        for target in re.findall(r'src="/static/([\w.-]+)"', asset.body.decode()):
            assert target in files, (path, target)


def test_the_web_files_go_into_the_wheel() -> None:
    """No file under tokenwire/web is git-ignored, which would leave it out of the wheel (hatchling)."""
    files = [str(p) for p in WEB_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert any(f.endswith("tokenwire.js") for f in files)
    ignored = subprocess.run(
        ["git", "check-ignore", *files], cwd=WEB_DIR, capture_output=True, text=True, check=False
    )
    assert ignored.stdout == ""  # exit 1: none ignored


def test_api_answers_carry_security_headers_too(gateway: GatewayServer) -> None:
    """JSON answers of the API (errors included) are nosniff, unframeable and not stored by caches."""
    for response in (
        requests.get(gateway.base_url + "/v1/models", timeout=10),
        requests.get(
            gateway.base_url + "/v1/models",
            headers={"Authorization": f"Bearer {gateway.api_key}"},
            timeout=10,
        ),
    ):
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
        assert response.headers["cache-control"] == "no-store"
