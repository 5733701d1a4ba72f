"""A pack's training step as CUDA graphs: captured once per pack layout and micro-batch width pattern,
then replayed, so the host launches one graph a step instead of thousands of kernels (on an H200 an eager
single trial of the default model took 159 ms a step, replayed as a graph (with the chunked loss) 20 ms).

Shapes must be static for that: with graphs on, micro-batch widths round up to a multiple of
``GRAPH_WIDTH`` (right padding is exact under causal attention), so a study needs few graphs, and the
pack copies each step's data rows, loss divisors and AdamW scalars into fixed buffers before a replay.
The graphs share one memory pool and read the pack's flat tensors by address; a new layout drops them.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from lora_ablate.errors import first_line

log = logging.getLogger(__name__)

GRAPH_WIDTH = 64  # micro-batch widths round up to a multiple of this: few distinct graphs
MIN_SPAN = 8  # a layout that lives fewer steps than this runs eagerly: capture would cost more than it saves
MAX_GRAPHS = 8  # distinct width patterns captured per layout; any further pattern runs eagerly
WARMUP = 2  # eager forward/backward passes on a side stream before capture (compiles, cuBLAS workspaces)


def bucket_widths(widths: list[list[int]], full: int) -> list[list[int]]:
    """Each micro-batch width rounded up to a multiple of GRAPH_WIDTH, at most ``full``."""
    return [[min(full, -(-w // GRAPH_WIDTH) * GRAPH_WIDTH) for w in ws] for ws in widths]


class StepGraphs:
    """The captured steps of the current layout, by width pattern; ``failed`` once a capture was refused."""

    def __init__(self, device: torch.device):
        self.device = device
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.pool = None
        self.keep: list = []  # tensors the graphs read that the pack might otherwise free (re-binds)
        self.failed = False

    def clear(self) -> None:
        self.graphs.clear()
        self.keep.clear()
        self.pool = None

    def replay(self, key: tuple, capture: Callable[[], "torch.cuda.CUDAGraph | None"]) -> bool:
        """Replay the graph of ``key``, capturing it first with ``capture()``; False: run this step eagerly."""
        graph = self.graphs.get(key)
        if graph is None:
            if self.failed or len(self.graphs) >= MAX_GRAPHS:
                return False
            graph = capture()
            if graph is None:
                return False
        graph.replay()
        return True

    def capture(self, key: tuple, warmup: Callable[[], None], undo: Callable[[], None], body: Callable[[], None],
                keep: list) -> torch.cuda.CUDAGraph | None:
        """``body`` as the graph of ``key``. ``warmup`` runs WARMUP times first on a side stream (compilation
        and lazy initialisation happen there, never inside a capture), then ``undo`` puts back what it
        changed; ``keep`` lists tensors the graph reads that must live as long as it does. On failure:
        a warning, ``undo`` again, ``failed`` set, None."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP):
                warmup()
        torch.cuda.current_stream(self.device).wait_stream(side)
        undo()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                body()
        except Exception as e:  # noqa: BLE001 - anything the capture refuses: eager steps are the reference
            log.warning("CUDA graph capture failed (%s: %s); training this pack without graphs",
                        type(e).__name__, first_line(e))
            self.failed = True
            torch.cuda.synchronize(self.device)
            undo()
            return None
        self.pool = self.pool or graph.pool()
        self.graphs[key] = graph
        self.keep.append(keep)
        return graph
