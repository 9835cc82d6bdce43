"""A process with an open candidate pool exits promptly: after an exception, and when nobody closes
the pool (an openai backend whose client is open, behind the SQLite cache)."""

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent("""
    import socket, sys
    from envs.candidates.pool import load_pool
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()  # nothing listens
    pool = load_pool({{
        "candidates": [{{"name": "A", "model": "m", "params_b": 1, "price_per_1m_output": 1.0}}],
        "backend": {{"kind": "openai", "base_url": f"http://127.0.0.1:{{port}}/v1", "max_retries": 0,
                     "timeout_s": 2}},
        "cache": {{"mode": "readwrite", "path": sys.argv[1]}},
    }})
    record = pool.call("A", "hello")
    assert record.error, record
    {ending}
""")


@pytest.mark.parametrize("ending, code", [("raise RuntimeError('boom')", 1), ("pass  # never closes the pool", 0)])
def test_a_process_with_an_open_pool_exits_within_seconds(tmp_path, ending, code):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(ending=ending))
    start = time.monotonic()
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "cache.sqlite")], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert done.returncode == code, done.stderr
    assert time.monotonic() - start < 20
    if code:
        assert "boom" in done.stderr


def test_close_is_idempotent_and_bounded():
    from envs.candidates.pool import CandidatePool
    from envs.candidates.simulated import SimulatedBackend
    from envs.candidates.spec import CandidateSpec

    class SlowClose(SimulatedBackend):
        async def aclose(self):
            import asyncio
            await asyncio.sleep(30)

    pool = CandidatePool([CandidateSpec("A", "m", 1, 1.0)], SlowClose({"A": lambda r: "x"}))
    assert pool.call("A", "q").reply == "x"
    start = time.monotonic()
    pool.close(timeout_s=0.5)
    pool.close()
    assert time.monotonic() - start < 5
