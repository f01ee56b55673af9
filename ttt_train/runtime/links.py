"""The network a run's context-parallel scan crosses: `parallel.links` (alpha-beta model).

Used by `parallel.cp_scan=auto` (at run time, per scan call) and by the dry-run plan's scan cost
(`ttt_train.training.plan`); the arithmetic is `ttt_train.ops.cp_scan.cost`. A message of `n`
bytes costs `latency + n / bandwidth` (GB = 1e9 bytes). Which CP hops cross nodes follows
megatron-core's rank order (tp fastest, then cp) with `gpus_per_node` consecutive global ranks per
node, as torchrun places them (at run time `LOCAL_WORLD_SIZE` replaces `gpus_per_node`).

Defaults: an HGX H100/H200 node, NVLink 4 point to point (about 300 GB/s achieved of 450) with
about 10 us per NCCL send/recv, and 8 x 400 Gb/s InfiniBand NDR, one 50 GB/s NIC per GPU (about
45 GB/s achieved) with about 20 us. Measure yours with nccl-tests' sendrecv_perf and set them.
"""

from __future__ import annotations

from dataclasses import dataclass

from ttt_train.config_keys import checked


@dataclass
class LinkConfig:
    """gpus_per_node: ranks per node; intra_node_* / inter_node_*: latency (microseconds) and
    bandwidth (GB/s, one direction, per GPU) of a point-to-point message within / between nodes."""

    gpus_per_node: int = checked(8, ge=1)
    intra_node_latency_us: float = checked(10.0, ge=0)
    intra_node_gb_per_s: float = checked(300.0, gt=0)
    inter_node_latency_us: float = checked(20.0, ge=0)
    inter_node_gb_per_s: float = checked(45.0, gt=0)
