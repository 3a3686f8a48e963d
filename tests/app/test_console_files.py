"""The console's static files at /ui: public (they hold no data), under a strict Content-Security-Policy,
and nothing outside app/console/static. The console itself is tested in Chromium (test_console.py)."""

from __future__ import annotations

import httpx


def test_the_console_page_is_public_and_holds_no_data(gateway):
    r = httpx.get(gateway.base + "/ui", follow_redirects=True)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert 'id="admin-key"' in r.text and "tiny" not in r.text
    js = httpx.get(gateway.base + "/ui/js/app.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert httpx.get(gateway.base + "/ui/vendor/cytoscape.min.js").status_code == 200


def test_the_console_serves_only_its_own_files(gateway):
    for path in ("/ui/../app/main.py", "/ui/%2e%2e/%2e%2e/pyproject.toml", "/ui/nothing.js", "/ui/js"):
        r = httpx.get(gateway.base + path)
        assert r.status_code == 404, path
        assert "error" in r.json()
    assert "/ui/" not in httpx.get(gateway.base + "/openapi.json").json()["paths"]
