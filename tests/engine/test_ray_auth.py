"""engine.ray_client.remote_without_auth: a Ray cluster on another machine is joined only with
Ray's token authentication on (anyone reaching an open cluster runs code on its nodes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.ray_client import remote_without_auth


@pytest.mark.parametrize("address", ["", "local", "auto", "127.0.0.1:6379", "ray://localhost:10001", "[::1]:6379"])
def test_this_machine_needs_nothing(address: str, tmp_path: Path) -> None:
    assert remote_without_auth(address, {}, home=tmp_path) is None


@pytest.mark.parametrize("address", ["10.0.0.5:6379", "ray://gpu-box:10001", "head.example.org:6379"])
def test_another_machine_needs_token_auth(address: str, tmp_path: Path) -> None:
    assert "RAY_AUTH_MODE=token" in (remote_without_auth(address, {}, home=tmp_path) or "")
    no_token = remote_without_auth(address, {"RAY_AUTH_MODE": "token"}, home=tmp_path)
    assert no_token is not None and "no token" in no_token
    assert remote_without_auth(address, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "t"}, home=tmp_path) is None
    token_file = tmp_path / "token"
    token_file.write_text("t")
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}
    assert remote_without_auth(address, env, home=tmp_path) is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("t")
    assert remote_without_auth(address, {"RAY_AUTH_MODE": "token"}, home=tmp_path) is None
