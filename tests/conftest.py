"""Fixtures of the real-process tests (tests/workers.py)."""

import pytest

from tests.workers import REDIS, PrivateBroker, use_broker


@pytest.fixture
def broker(tmp_path, settings):
    if REDIS is None:
        pytest.skip("redis-server is not installed (make test's `services` target starts one)")
    settings.CELERY_TASK_ALWAYS_EAGER = False
    b = PrivateBroker(tmp_path)
    b.start()
    use_broker(b.url)
    yield b
    use_broker(None)
    if b.proc and b.proc.poll() is None:
        b.kill()
