"""How many requests a server decodes at once (its slots) and how much context each gets, when PARALLEL=auto.

On a GPU, decoding 32 sequences costs little more than one (the weights are read once a step): 32 slots, the
context fitted to the free memory by the engine. On a CPU a step of many sequences is also cheaper per token
than many steps of one (SmolLM2 on 2 cores: the engine decodes 25 tokens/s for one sequence, 119 for 8, 224 for
32): up to 16 slots a core (at most 32), each with its own context of up to 4,096 tokens (the model's own, if
shorter), as long as their KV cache takes at most a seventh of the memory that is available; fewer slots where
it would take more.
"""
from __future__ import annotations

import os
from pathlib import Path

from lib.gguf_meta import context_length, kv_bytes_per_token, read_metadata

GPU_SLOTS = 32
CPU_SLOTS_PER_CORE, CPU_MAX_SLOTS, CPU_MIN_SLOTS = 16, 32, 4
SLOT_CONTEXT = 4096
MEMORY_SHARE = 1 / 7


def available_memory() -> int | None:
    """Bytes of memory available to new processes (Linux's MemAvailable), or None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def cpu_slots(model: Path, cores: int | None = None, memory: int | None = None) -> tuple[int, int]:
    """(slots, context per slot) for serving model on the CPU."""
    meta = read_metadata(model)
    per_slot = min(context_length(meta) or SLOT_CONTEXT, SLOT_CONTEXT)
    if not cores:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    slots = max(CPU_MIN_SLOTS, min(CPU_MAX_SLOTS, CPU_SLOTS_PER_CORE * cores))
    memory = memory if memory is not None else available_memory()
    per_token = kv_bytes_per_token(meta)
    if memory and per_token:
        budget = memory * MEMORY_SHARE
        while slots > CPU_MIN_SLOTS and slots * per_slot * per_token > budget:
            slots //= 2
    return slots, per_slot
