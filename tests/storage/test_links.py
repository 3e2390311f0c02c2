"""Artifact links: the served URL when CIRCUITFLOW_SERVE_URL is set, else the command that serves it."""

from __future__ import annotations

from storage import links


def test_links_follow_the_configured_server(monkeypatch, tmp_path):
    monkeypatch.delenv(links.SERVE_URL_ENV, raising=False)
    assert links.served_link("/mine/abc/") is None
    hint = links.serve_hint(tmp_path, "/mine/abc/")
    assert f"circuitflow serve --store {tmp_path.resolve()}" in hint and "http://127.0.0.1:4300/mine/abc/" in hint
    monkeypatch.setenv(links.SERVE_URL_ENV, "http://10.0.0.5:8000/ ")
    assert links.served_link("/trace/k/") == "http://10.0.0.5:8000/trace/k/"
    assert links.serve_hint(tmp_path, "/trace/k/") == "[http://10.0.0.5:8000/trace/k/](http://10.0.0.5:8000/trace/k/)"
