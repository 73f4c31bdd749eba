"""Fixtures: designed checkpoints built once per run, and live servers on them."""

from __future__ import annotations

import pytest

from qwenserve import checkpoints

from .helpers import LiveServer


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def vl_ckpt(ckpt_dir):
    return checkpoints.build_vl_checkpoint(ckpt_dir / "vl-thinking")


@pytest.fixture(scope="session")
def endless_ckpt(ckpt_dir):
    return checkpoints.build_vl_checkpoint(ckpt_dir / "vl-endless", endless=True)


@pytest.fixture(scope="session")
def text_ckpt(ckpt_dir):
    return checkpoints.build_text_checkpoint(ckpt_dir / "text")


@pytest.fixture(scope="session")
def random_text_ckpt(ckpt_dir):
    return checkpoints.build_text_checkpoint(ckpt_dir / "text-random", random=True)


@pytest.fixture(scope="session")
def small_context_ckpt(ckpt_dir):
    return checkpoints.build_text_checkpoint(ckpt_dir / "text-small", endless=True, context=40)


def _servers(log_dir):
    """A function that starts live servers, and stops them all when the fixture ends."""
    servers: list[LiveServer] = []

    def start(model_dir, **env) -> LiveServer:
        server = LiveServer(model_dir, log_dir, **env)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def server_factory(log_dir):
    yield from _servers(log_dir)


@pytest.fixture(scope="module")
def server_factory_module(log_dir):
    """Like server_factory, for servers shared by the tests of one module."""
    yield from _servers(log_dir)


def _session_server(request, log_dir, model_dir, **env):
    server = LiveServer(model_dir, log_dir, **env)
    request.addfinalizer(server.stop)
    return server


@pytest.fixture(scope="session")
def vl_server(request, log_dir, vl_ckpt):
    return _session_server(request, log_dir, vl_ckpt, MAX_REQUEST_BYTES=200_000)


@pytest.fixture(scope="session")
def text_server(request, log_dir, text_ckpt):
    return _session_server(request, log_dir, text_ckpt)


@pytest.fixture(scope="session")
def endless_server(request, log_dir, endless_ckpt):
    return _session_server(request, log_dir, endless_ckpt, CANCEL_AFTER_DISCONNECT_SECONDS=1.5)


@pytest.fixture(scope="session")
def tight_server(request, log_dir, endless_ckpt):
    """Small limits: one batch slot, a 64-event ring buffer, fast pings."""
    return _session_server(request, log_dir, endless_ckpt, MAX_CONCURRENT_REQUESTS=1, SESSIONS_BUFFER_EVENTS=64,
                           SSE_PING_SECONDS=0.2)


@pytest.fixture(scope="session")
def random_vl_ckpt(ckpt_dir):
    return checkpoints.build_vl_checkpoint(ckpt_dir / "vl-random", random=True)
