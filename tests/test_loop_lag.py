"""The event-loop lag probe the daemon exports as ``dicomfw_event_loop_lag_seconds``."""

from __future__ import annotations

import asyncio
import time

from dicomfw.observe.metrics import LoopLagProbe


def test_a_callback_that_blocks_the_loop_shows_as_lag_and_a_quiet_loop_as_none() -> None:
    lags: list[float] = []

    async def run() -> None:
        loop = asyncio.get_running_loop()
        probe = LoopLagProbe(loop, lags.append, interval=0.02)
        probe.start()
        await asyncio.sleep(0.1)  # quiet: each timer runs about on time
        quiet = len(lags)
        loop.call_soon(time.sleep, 0.15)  # a blocking call on the loop, as a bug would be
        await asyncio.sleep(0.2)
        probe.stop()
        stopped = len(lags)
        await asyncio.sleep(0.05)
        assert quiet >= 3 and max(lags[:quiet]) < 0.015
        assert max(lags[quiet:]) >= 0.1
        assert len(lags) == stopped  # no sample after ``stop``

    asyncio.run(run())
