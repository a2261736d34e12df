"""Where whole layers lie in the flat tensors DeepSpeed steps: ZeRO's internals are read here
and nowhere else.

ZeRO (stages 1-3) and DeepSpeed's bf16 optimiser flatten and partition the parameters, so a
layer-wise optimiser (LARS, LAMB: `sfrik_scale.optim.LayerwiseTrustOptimizer`) would compute
its trust ratios per shard. `attach_zero_layout` tells it which slices of its flat tensors
belong to which layer, and checks on every rank that the pieces add up to whole layers.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import torch

from sfrik_scale import comm
from sfrik_scale.optim import LayerSegments, LayerwiseTrustOptimizer

__all__ = ["attach_zero_layout"]


def attach_zero_layout(optimizer: torch.optim.Optimizer, engine: Any) -> str:
    """Tell a LARS/LAMB where whole layers lie in the flat tensors DeepSpeed will step.

    Call on every rank right after ``deepspeed.initialize`` (and again after loading a
    checkpoint if the engine was rebuilt); idempotent. Collective for ZeRO: it all-reduces
    once to check that the pieces of every layer add up to the whole layer.

    Args:
        optimizer: the optimiser given to ``deepspeed.initialize``.
        engine: the DeepSpeed engine it returned (its ``.optimizer`` is the optimiser
            itself, or the ZeRO/bf16 wrapper around it).

    Returns:
        What was found: "elementwise" (not a trust-ratio optimiser: nothing to do),
        "per-parameter" (no flattening), "zero-1/2" (stage 1/2 or the bf16 optimiser:
        flat partitions), "zero-3" (partitioned sub-groups).

    Raises:
        ValueError: the engine's optimiser neither is nor wraps ``optimizer``.
        RuntimeError: the map does not match the data (each mapped slice must equal the
            model parameter slice it claims to be, and the pieces of every layer must add
            up to the whole layer across ranks) -- DeepSpeed's internals changed.

    DeepSpeed internals relied on (checked against 0.19.8, verified at call time):
      * stage 1/2 (``DeepSpeedZeroOptimizer``): the wrapped optimiser's group i holds one
        flat fp32 partition, elements [r * n, (r + 1) * n) of the group's flat buffer,
        n = ``partition_size[i]``, r = rank in ``real_dp_process_group[i]``; the buffer
        concatenates ``round_robin_bit16_groups[i]`` at ``round_robin_bit16_offsets[i]``
        (cumulative sizes when that attribute is absent); ``bit16_groups[i]`` lists the
        group's parameters in their original order (the layer index).
      * ``BF16_Optimizer`` (bf16 + ZeRO-1 with fp32 gradient accumulation): the same with
        ``bf16_groups[i]`` in order and n = ``bf16_groups_flat[i].numel() // world``.
      * stage 3 (``DeepSpeedZeroOptimizer_Stage3``): ``fp32_partitioned_groups_flat[s]``
        concatenates ``p.partition_numel()`` elements per parameter of ``fp16_groups[s]``,
        rank r holding elements [r * n, (r + 1) * n) of each flattened parameter (tail
        padding excluded); ``sub_group_process_groups[s]``; ``step()`` is called once per
        sub-group with only that flat tensor in its group.
      * bf16/fp16 without ZeRO (``FP16_UnfusedOptimizer``): one fp32 copy per parameter.
        Note that it calls ``step()`` once with zero gradients inside ``initialize`` (to
        create optimiser state): with the warm-up's lr of 0 nothing moves, but LARS starts
        with momentum eta * w and LAMB with a step count of 1 (AdamW is affected alike).
    """
    if not isinstance(optimizer, LayerwiseTrustOptimizer):
        return "elementwise"
    wrapper = engine.optimizer
    optimizer.clear_layer_segments()
    if wrapper is optimizer:
        return "per-parameter"
    if getattr(wrapper, "optimizer", None) is not optimizer:
        raise ValueError(f"{type(wrapper).__name__} does not wrap the given {type(optimizer).__name__}")
    # The engine's accelerator: partitions offloaded to CPU still all-reduce there (NCCL
    # takes no CPU tensors).
    engine_device = getattr(engine, "device", None)
    comm_device = torch.device(engine_device) if engine_device is not None else None
    if hasattr(wrapper, "fp32_partitioned_groups_flat"):
        _attach_stage3(optimizer, wrapper, comm_device)
        return "zero-3"
    if hasattr(wrapper, "bit16_groups") or hasattr(wrapper, "bf16_groups"):
        _attach_flat_partitions(optimizer, wrapper, comm_device)
        return "zero-1/2"
    # e.g. the bf16/fp16 stage-0 wrapper, which keeps one fp32 master copy per parameter.
    optimizer.declare_whole_layers()
    return "per-parameter"


def _attach_flat_partitions(optimizer: LayerwiseTrustOptimizer, wrapper: Any,
                            comm_device: Optional[torch.device]) -> None:
    # Computed from the flattening itself rather than from the parameters' ``_hp_mapping``:
    # DeepSpeed 0.19.8 builds that mapping in the original parameter order even when
    # round_robin_gradients reorders the flat buffer (and no alignment padding occurs), so
    # it then points at the wrong slices.
    stage12 = hasattr(wrapper, "round_robin_bit16_groups")
    lp_groups = wrapper.bit16_groups if stage12 else wrapper.bf16_groups
    for gi, lp_params in enumerate(lp_groups):
        flat = optimizer.param_groups[gi]["params"][0]
        dp_group = wrapper.real_dp_process_group[gi]
        rank, world = comm.rank_and_world(dp_group)
        if stage12:
            in_flat_order = wrapper.round_robin_bit16_groups[gi]
            partition_size = int(wrapper.partition_size[gi])
            offsets = getattr(wrapper, "round_robin_bit16_offsets", [None] * len(lp_groups))[gi]
        else:  # BF16_Optimizer: original order, padding only at the end of the group
            in_flat_order = lp_params
            partition_size = wrapper.bf16_groups_flat[gi].numel() // world
            offsets = None
        if offsets is None:  # no alignment padding between parameters
            offsets = [sum(p.numel() for p in in_flat_order[:k]) for k in range(len(in_flat_order))]
        if flat.numel() != partition_size:
            raise RuntimeError(f"ZeRO group {gi}: flat partition has {flat.numel()} elements, expected "
                               f"{partition_size} (unexpected DeepSpeed layout)")
        layer_of = {id(p): li for li, p in enumerate(lp_params)}
        low, high = rank * partition_size, (rank + 1) * partition_size
        starts, lengths, layers, pieces = [], [], [], []
        for p, offset in zip(in_flat_order, offsets):
            first, last = max(int(offset), low), min(int(offset) + p.numel(), high)
            if first < last:  # this rank holds elements [first, last) of the group's flat buffer
                starts.append(first - low)
                lengths.append(last - first)
                layers.append(layer_of[id(p)])
                pieces.append((p.detach().reshape(-1).narrow(0, first - int(offset), last - first), first - low))
        segments = LayerSegments(numel=flat.numel(), starts=starts, lengths=lengths, layers=layers,
                                 num_layers=len(lp_params), group=dp_group, reduce=True, comm_device=comm_device)
        _verify(flat, segments, pieces, [p.numel() for p in lp_params])
        optimizer.set_layer_segments(flat, segments)


def _attach_stage3(optimizer: LayerwiseTrustOptimizer, wrapper: Any, comm_device: Optional[torch.device]) -> None:
    for sid, (params, flat) in enumerate(zip(wrapper.fp16_groups, wrapper.fp32_partitioned_groups_flat)):
        group = wrapper.sub_group_process_groups[sid]
        rank, _ = comm.rank_and_world(group)
        starts, lengths, layers, pieces = [], [], [], []
        offset = 0
        for li, p in enumerate(params):
            per_rank = int(p.partition_numel())
            valid = max(0, min(int(p.ds_numel) - rank * per_rank, per_rank))  # tail padding is not the layer
            if valid:
                starts.append(offset)
                lengths.append(valid)
                layers.append(li)
                if p.ds_tensor is not None and p.ds_tensor.numel() >= valid:
                    pieces.append((p.ds_tensor.detach().reshape(-1).narrow(0, 0, valid), offset))
            offset += per_rank
        if offset != flat.numel():
            raise RuntimeError(f"ZeRO-3 sub-group {sid}: parameter partitions add up to {offset} elements, "
                               f"the flat fp32 partition has {flat.numel()} (unexpected DeepSpeed layout)")
        segments = LayerSegments(numel=flat.numel(), starts=starts, lengths=lengths, layers=layers,
                                 num_layers=len(params), group=group, reduce=True, comm_device=comm_device)
        _verify(flat, segments, pieces, [int(p.ds_numel) for p in params])
        optimizer.set_layer_segments(flat, segments)


def _verify(flat: torch.Tensor, segments: LayerSegments, pieces: Sequence[Tuple[torch.Tensor, int]],
            layer_numels: Sequence[int]) -> None:
    """Check the map against the data, so a change in DeepSpeed's internals fails loudly.

    Locally, each model-precision piece must equal the fp32 master slice it is mapped to;
    across ranks (one all-reduce), the pieces of each layer must add up to the whole layer.
    """
    for lp_piece, start in pieces:
        master = flat.detach().narrow(0, start, lp_piece.numel()).to(device=lp_piece.device, dtype=lp_piece.dtype)
        if not torch.equal(master, lp_piece):
            raise RuntimeError(f"ZeRO layout check failed: the fp32 partition at offset {start} does not hold "
                               f"the parameter slice mapped there (unexpected DeepSpeed internals)")
    covered = torch.zeros(segments.num_layers, dtype=torch.int64, device=segments.comm_device or flat.device)
    for length, layer in zip(segments.lengths, segments.layers):
        covered[layer] += length
    comm.all_reduce_(covered, segments.group)
    expected = torch.tensor(layer_numels, dtype=torch.int64, device=covered.device)
    if not torch.equal(covered, expected):
        raise RuntimeError(f"ZeRO layout check failed: pieces cover {covered.tolist()} elements "
                           f"per layer across ranks, layers have {list(layer_numels)}")
