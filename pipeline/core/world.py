"""Where this process stands among torchrun's processes, read from the environment alone.

The command line needs this before it knows which stage runs (a stage that is not one of
:data:`DISTRIBUTED_STAGES` refuses torchrun); reading it without torch lets the commands that never feed a network
start without loading torch. Joining the processes into a group is :mod:`pipeline.model.distributed`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

DISTRIBUTED_STAGES = ("train", "embed", "retrain")  # the stages that feed images through a network


@dataclass(frozen=True)
class World:
    """This process's place among the stage's processes: ``rank`` of ``size``, ``local_rank`` on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes the run."""
        return self.rank == 0


def launched() -> World:
    """What torchrun's environment says this process is (rank 0 of 1 when it was not started by torchrun)."""
    return World(rank=int(os.environ.get("RANK", "0")), size=int(os.environ.get("WORLD_SIZE", "1")),
                 local_rank=int(os.environ.get("LOCAL_RANK", "0")))
