"""Reading collectives and loop trip counts from compiled HLO text, against hand counts."""

import collections

import pytest

from warp_jax import hlo

# A decode loop (its bound, 6, in its condition) around a scan over 3 layers (trips known to
# the compiler), a loop whose trips nothing tells; XLA's three spellings of device groups; an
# asynchronous all-gather; a reduce-scatter over all devices, and one as the TPU compiler
# writes it (an all-reduce in an `all-reduce-scatter` fusion, over groups of 4); channel 1 on
# several collectives, which count apart, as the TPU compiler writes them; an all-gather the
# TPU compiler overlaps with a matmul, as a chain of three fusions each holding a copy of it
# (its start, a continuation, its done), which counts once.
PROGRAM = """HloModule jit_step, entry_computation_layout={()->f32[4]{0}}, num_partitions=8

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(f32[] %x, f32[] %y)
}

%all-reduce-scatter.3 (input.3: f32[64]) -> f32[16] {
  %input.3 = f32[64]{0} parameter(0)
  %all-reduce.9 = f32[64]{0} all-reduce(%input.3), channel_id=1, replica_groups=[2,4]<=[8], to_apply=%add
  ROOT %slice.1 = f32[16]{0} dynamic-slice(%all-reduce.9, %offset), dynamic_slice_sizes={16}
}

%layer_body (p: (s32[], bf16[4,8])) -> (s32[], bf16[4,8]) {
  %p = (s32[], bf16[4,8]{1,0}) parameter(0)
  %w = bf16[4,8]{1,0} get-tuple-element(%p), index=1
  %ag = bf16[16,8]{1,0} all-gather(%w), channel_id=1, replica_groups=[2,4]<=[8], dimensions={0}
  %ar = f32[32]{0} all-reduce(%z), channel_id=2, replica_groups={{0,1},{2,3},{4,5},{6,7}}, to_apply=%add
  ROOT %t = (s32[], bf16[4,8]{1,0}) tuple(%i, %w)
}

%layer_cond (p: (s32[], bf16[4,8])) -> pred[] {
  %p = (s32[], bf16[4,8]{1,0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

%decode_body (q: (s32[], bf16[4,8])) -> (s32[], bf16[4,8]) {
  %q = (s32[], bf16[4,8]{1,0}) parameter(0)
  %layers = (s32[], bf16[4,8]{1,0}) while(%q), condition=%layer_cond, body=%layer_body, backend_config={"known_trip_count":{"n":"3"}}
  %ags = (bf16[2,8]{1,0}, bf16[8,8]{1,0}) all-gather-start(%v), channel_id=3, replica_groups=mesh['a'=2,'b'=4] {'b'}, dimensions={0}
  %agd = bf16[8,8]{1,0} all-gather-done(%ags)
  %cp = f32[10]{0} collective-permute(%u), channel_id=4, source_target_pairs={{0,1},{1,0}}
  ROOT %r = (s32[], bf16[4,8]{1,0}) tuple(%i, %w)
}

%decode_cond (q: (s32[], bf16[4,8])) -> pred[] {
  %n = s32[1]{0:T(128)} constant({6})
  %yes = pred[] constant(true)
  %q = (s32[], bf16[4,8]{1,0}) parameter(0)
  %i = s32[1]{0} get-tuple-element(%q), index=0
  ROOT %lt = pred[1]{0} compare(%i, %n), direction=LT
}

%other_body (q: (s32[], bf16[4,8])) -> (s32[], bf16[4,8]) {
  %q = (s32[], bf16[4,8]{1,0}) parameter(0)
  %cp2 = u8[8]{0} collective-permute(%u), source_target_pairs={{0,1},{1,0}}
  ROOT %r = (s32[], bf16[4,8]{1,0}) tuple(%i, %w)
}

%other_cond (q: (s32[], bf16[4,8])) -> pred[] {
  %q = (s32[], bf16[4,8]{1,0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

%chain_start (a: bf16[2,8]) -> (bf16[2,8], bf16[16,8], s32[2]) {
  %a = bf16[2,8]{1,0} parameter(0)
  %ag.1 = bf16[16,8]{1,0} all-gather(%a), channel_id=1, replica_groups=[1,8]<=[8], dimensions={0}, frontend_attributes={chain_id="5"}
  ROOT %cc = (bf16[2,8]{1,0}, bf16[16,8]{1,0}, s32[2]{0}) custom-call(%ag.1), custom_call_target="AsyncCollectiveStart"
}

%chain_overlap (a: bf16[2,8], x: f32[4,4]) -> (f32[4,4], bf16[2,8], bf16[16,8]) {
  %a = bf16[2,8]{1,0} parameter(0)
  %x = f32[4,4]{1,0} parameter(1)
  %mm = f32[4,4]{1,0} dot(%x, %x), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %ag.2 = bf16[16,8]{1,0} all-gather(%a), channel_id=1, replica_groups=[1,8]<=[8], dimensions={0}, frontend_attributes={chain_id="5"}
  ROOT %t = (f32[4,4]{1,0}, bf16[2,8]{1,0}, bf16[16,8]{1,0}) tuple(%mm, %a, %ag.2)
}

%chain_done (a: bf16[2,8]) -> bf16[16,8] {
  %a = bf16[2,8]{1,0} parameter(0)
  %ag.3 = bf16[16,8]{1,0} all-gather(%a), channel_id=1, replica_groups=[1,8]<=[8], dimensions={0}, frontend_attributes={chain_id="5"}
  ROOT %cd = bf16[16,8]{1,0} custom-call(%ag.3), custom_call_target="AsyncCollectiveDone"
}

ENTRY %main.1 () -> f32[4] {
  %rs = f32[4]{0} reduce-scatter(%big), channel_id=1, replica_groups={}, dimensions={0}, to_apply=%add
  %async-collective-start.5 = (bf16[2,8]{1,0}, bf16[16,8]{1,0}, s32[2]{0}) fusion(%shard), kind=kCustom, calls=%chain_start
  %fusion.7 = (f32[4,4]{1,0}, bf16[2,8]{1,0}, bf16[16,8]{1,0}) fusion(%shard, %x), kind=kOutput, calls=%chain_overlap
  %async-collective-done.5 = bf16[16,8]{1,0} fusion(%shard), kind=kCustom, calls=%chain_done
  %grads = f32[16]{0} fusion(%g), kind=kOutput, calls=%all-reduce-scatter.3
  %loop = (s32[], bf16[4,8]{1,0}) while(%init), condition=%decode_cond, body=%decode_body
  %other = (s32[], bf16[4,8]{1,0}) while(%init), condition=%other_cond, body=%other_body
  ROOT %out = f32[4]{0} copy(%rs)
}
"""


def test_collectives_are_counted_per_trip_and_sized_by_their_groups():
    got = hlo.traffic(PROGRAM, unknown_trips=7)
    # Per layer: all-gather 256 B over 4 devices (3/4 received), all-reduce 128 B over 2
    # (2 x 1/2). Per decode step: 3 layers, an all-gather of 128 B over 4, a permute of 40 B.
    layer = {"all-gather": 256 * 3 / 4, "all-reduce": 2 * 128 / 2}
    step = {"all-gather": 3 * layer["all-gather"] + 128 * 3 / 4,
            "all-reduce": 3 * layer["all-reduce"], "collective-permute": 40}
    chain = 256 * 7 / 8  # the overlapped all-gather: 256 B over 8 devices, once
    assert got.bytes == {"all-gather": 6 * step["all-gather"] + chain,
                         "all-reduce": 6 * step["all-reduce"],
                         # its input is 8 x 16 B, all devices; the fused one 256 B over 4
                         "reduce-scatter": 16 * 7 + 256 * 3 / 4,
                         "all-to-all": 0.0,
                         "collective-permute": 6 * step["collective-permute"] + 7 * 8}
    assert got.counts == {"all-gather": 24 + 1, "all-reduce": 18, "reduce-scatter": 2,
                          "all-to-all": 0, "collective-permute": 6 + 7}
    assert got.total_bytes == sum(got.bytes.values())
    loops = {loop["name"]: loop for loop in got.loops}
    assert loops == {
        "loop": {"name": "loop", "trips": 6, "trips_from": "condition", "bytes_per_trip": step,
                 "largest": {"all-gather": 256 * 3 / 4, "all-reduce": 128,
                             "collective-permute": 40}},
        "layers": {"name": "layers", "trips": 3, "trips_from": "compiler",
                   "bytes_per_trip": layer, "largest": layer},
        "other": {"name": "other", "trips": 7, "trips_from": "assumed",
                  "bytes_per_trip": {"collective-permute": 8},
                  "largest": {"collective-permute": 8}}}


def test_each_collective_instruction_is_listed_once():
    # An asynchronous pair once, a chain once, the fused all-reduce as the reduce-scatter
    # it is.
    assert collections.Counter(hlo.instructions(PROGRAM)) == {
        "all-gather": 3, "all-reduce": 1, "reduce-scatter": 2, "collective-permute": 2}


def test_shapes_and_groups():
    assert hlo.shape_bytes("(bf16[2,8]{1,0}, f32[3], pred[])") == 2 * 16 + 4 * 3 + 1
    assert hlo.group_size("replica_groups=[4,16]<=[64]", 64) == 16
    assert hlo.group_size("replica_groups={{0,2,4},{1,3,5}}, dimensions={0}", 6) == 3
    assert hlo.group_size("replica_groups=mesh['x'=2,'y'=2,'z'=4] {'x','z'}", 16) == 8
    assert hlo.group_size("channel_id=1, dimensions={0}", 32) == 32


def test_text_without_an_entry_is_refused():
    with pytest.raises(ValueError, match="no ENTRY computation"):
        hlo.traffic("HloModule m\n")
