"""A projected H-device prefill time from hosts that took turns on one device (`apb bench --workers 1`).

With every host of the run in one process (apb_core.dist.local_hosts, `timed`), the ledger holds, for each
collective, each host's compute since its previous collective (device-synchronised). On H devices the hosts
would compute those segments side by side, and each all-gather would move its bytes over the links:

    projected = sum over collectives of max over hosts of the segment
              + sum over all-gathers of (H - 1) x bytes sent per host / link bandwidth

The bandwidth is a bus bandwidth (NCCL's convention: a ring all-gather moves (H - 1)/H of the output through
every link). Per-collective latency is left out, so the communication term is a lower bound; the compute
term assumes that the H devices are the one that was measured. Labelled "projected" wherever it is shown.
"""

from __future__ import annotations

from dataclasses import dataclass

from apb_core.dist.local_hosts import Op

# all-gather bandwidth measured between the two H200s of an nvidia-h200-x2 machine (256 MiB per rank, NVLink)
PROJECTED_LINK_GIBPS = 238.0


@dataclass
class Projection:
    prefill_s: float  # compute_s + comm_s
    compute_s: float  # the slowest host of every segment
    comm_s: float  # the all-gathers at the link bandwidth
    host_busy_s: list[float]  # each host's own compute over the prefill


def project(ops: list[Op], link_gibps: float = PROJECTED_LINK_GIBPS) -> Projection:
    """The projection of one prefill from its ledger `ops` (every collective from its start to its closing barrier)."""
    hosts = len(ops[0].busy_s)
    compute = sum(max(op.busy_s) for op in ops)
    sent = sum(op.send_bytes for op in ops if op.kind == "all_gather")
    comm = (hosts - 1) * sent / (link_gibps * 2**30)
    busy = [sum(op.busy_s[r] for op in ops) for r in range(hosts)]
    return Projection(compute + comm, compute, comm, busy)
