"""Test-only patch: make accelerate (1.16) shard on the CPU, so that tests/test_fsdp.py can run
the trainer's FSDP2 path on 2 CPU processes over gloo.

tests/test_fsdp.py puts this folder first on PYTHONPATH of the processes it launches (Python
imports `sitecustomize` at start-up); neither the test process nor the product imports it.

accelerate turns ACCELERATE_USE_FSDP=true into DistributedType.FSDP in AcceleratorState.__init__
only for accelerator process groups (MULTI_GPU / NPU / XPU / HPU / ...); a CPU process group
(gloo) stays MULTI_CPU and Accelerator.prepare wraps the model in DDP. torch itself shards over
gloo (`fully_shard` works), so this wrapper does, for MULTI_CPU, what that branch does for the
GPU: distributed_type FSDP and the FSDP plugin that Accelerator.__init__ built from the
environment (FullyShardedDataParallelPlugin(), from ACCELERATE_USE_FSDP / FSDP_*) and passed in.
Only a process started with ACCELERATE_USE_FSDP=true (the ranks of an FSDP launch) is patched;
any other (the launcher itself) does not even import accelerate here.
"""

from __future__ import annotations

import functools
import os


def _use_fsdp() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def _patch() -> None:
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    @functools.wraps(init)
    def init_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        # accelerate's own FSDP branch, for the process group it leaves out (state.py, "elif
        # self.distributed_type in [DistributedType.MULTI_GPU, ...]"); AcceleratorState is shared
        # state: a later AcceleratorState() finds it FSDP already and changes nothing
        if fsdp_plugin is not None and _use_fsdp() and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = self.distributed_type

    AcceleratorState.__init__ = init_fsdp_on_cpu


if _use_fsdp():
    _patch()
