"""`python -m tests.step_recorder serve ...`: the real CLI, with every decode step written down as it happens.

Each line of the file named by $MERGESERVE_STEP_LOG is one decode step, `<arm> <batch size>`, in the order the model
thread ran them: the observations behind `mergeserve_batch_size{mode}` on /metrics, kept in order (the histogram
loses it). Two arms in flight together show up as steps of one arm between steps of the other, whatever the client
believed it was doing, so the A/B load's own bookkeeping is not needed to see it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from server import cli
from server.http import metrics


def main() -> int:
    log = Path(os.environ["MERGESERVE_STEP_LOG"]).open("a", buffering=1)  # noqa: SIM115  # open while serving
    real = metrics.Metrics.observe_step

    def observe_step(self: metrics.Metrics, mode: str, batch_size: int, queue_size: int) -> None:
        log.write(f"{mode} {batch_size}\n")
        real(self, mode, batch_size, queue_size)

    metrics.Metrics.observe_step = observe_step  # type: ignore[method-assign]
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
