"""A job joins the Ray cluster Ray would find, unless that cluster is dead (a stale address file)."""

from __future__ import annotations

import socket

import pytest

from pipeline import cluster


@pytest.fixture
def ray_temp_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # Ray's temp dir, where `ray start` records its address
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (tmp_path / "ray").mkdir()
    return tmp_path / "ray"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_address_file_is_where_ray_reads_it(ray_temp_dir):
    assert cluster.recorded_address_file() == ray_temp_dir / "ray_current_cluster"


def test_no_recorded_cluster_lets_ray_decide(ray_temp_dir):
    assert cluster.ray_init_address() is None


def test_a_dead_recorded_cluster_is_skipped_for_a_local_one(ray_temp_dir, caplog):
    (ray_temp_dir / "ray_current_cluster").write_text(f"127.0.0.1:{_closed_port()}\n")
    assert cluster.ray_init_address() == "local"
    assert "does not answer" in caplog.text


def test_a_live_recorded_cluster_is_joined(ray_temp_dir):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        (ray_temp_dir / "ray_current_cluster").write_text(f"127.0.0.1:{listener.getsockname()[1]}")
        assert cluster.ray_init_address() is None


def test_an_address_asked_for_by_name_is_never_second_guessed(ray_temp_dir, monkeypatch):
    (ray_temp_dir / "ray_current_cluster").write_text(f"127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{_closed_port()}")
    assert cluster.ray_init_address() is None


@pytest.mark.parametrize("address", ["", "no-port", "host:notaport"])
def test_a_garbled_address_does_not_answer(address):
    assert not cluster.answers(address, timeout_s=0.5)
