"""Sharded and data-parallel training: DTensor / FSDP2 shards, torch.distributed checkpoints.

An EMA of a sharded model keeps each rank's shadows as local shards with the parameters'
placements (:mod:`emakit.distributed.shards`): ``update()`` folds the local shard in without any
communication, the verbs work on the local shards, ``state_dict()`` returns DTensors (so
``torch.distributed.checkpoint`` saves and reshards them), and ``emakit.save`` gathers one
tensor at a time into one full file on rank 0 (:mod:`emakit.distributed.gather`).

Nothing here is imported by ``import emakit``; the engine reaches it only when a source holds
DTensors.
"""
