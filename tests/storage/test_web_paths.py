"""The store site's file route in-process: hidden folders stay hidden however the address encodes them."""

from __future__ import annotations

from pathlib import Path

import pytest

from storage.web import StoreSite


@pytest.fixture
def site(tmp_path: Path) -> StoreSite:
    store = tmp_path / "store"
    (store / "runs").mkdir(parents=True)
    (store / "runs" / "latest.json").write_text("{}")
    (store / ".locks").mkdir()
    (store / ".locks" / "k.lock").write_text("secret")
    (store / "mine" / "abc123.partial").mkdir(parents=True)
    (store / "mine" / "abc123.partial" / "x.json").write_text("half")
    (tmp_path / "outside.txt").write_text("OUTSIDE-CONTENT")
    return StoreSite(store)


def test_a_visible_file_is_served(site: StoreSite) -> None:
    assert site.respond("/files/runs/latest.json").status == 200


@pytest.mark.parametrize(
    "target",
    [
        "/files/.locks/k.lock",
        "/files/runs%2F..%2F.locks%2Fk.lock",  # an encoded slash hides the hidden part inside one segment
        "/files/runs%2F..%2Fmine%2Fabc123.partial%2Fx.json",
        "/files/mine/abc123.partial/x.json",
        "/files/..%2Foutside.txt",
        "/files/runs%2F..%2F..%2Foutside.txt",
    ],
)
def test_hidden_unfinished_and_outside_files_are_refused(site: StoreSite, target: str) -> None:
    response = site.respond(target)
    assert response.status in (403, 404), target
    assert b"secret" not in response.body and b"half" not in response.body and b"OUTSIDE-CONTENT" not in response.body


@pytest.mark.parametrize("key", ["abcdef\n", "abcdef%0a", "ABCDEF", "abc"])
def test_stage_keys_in_addresses_are_whole_hex_strings(site: StoreSite, key: str) -> None:
    assert site.respond(f"/mine/{key}/").status == 404
