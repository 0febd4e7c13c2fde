"""What a compiled program sends over the interconnect: its collectives read from the
optimized HLO text, each loop's body counted as many times as the loop runs.

XLA's cost analysis counts a loop's body once; a collective inside the sampler's decode loop
runs once per sampled token, one inside a scan over layers once per layer. This module walks
the program's computations from its entry, multiplies the collectives of each `while` body by
its trips and sizes each collective from its result shape and its group. A loop's trips are
XLA's `known_trip_count` where the compiler records it, else the bound its condition compares
the counter with (the one integer constant of the condition: a scan's length; the decode
loop's `max_new_tokens`, which it may stop before), else the caller's count.

Each collective instruction counts on its own (an asynchronous pair once, on its `-done`):
their channel ids do not tell them apart, as the TPU compiler gives many collectives channel 1.
One collective that the TPU compiler overlaps with computation is a chain of fusions (an
`async-collective-start`, continuation fusions, an `async-collective-done`), each holding a
copy of the collective tagged with the chain's `chain_id` frontend attribute: a chain counts
once.
Bytes are those one chip receives per call (a ring algorithm sends as many):
all-gather `R (n-1)/n` of its result R, reduce-scatter `R (n-1)` (its input is n R),
all-reduce `2 R (n-1)/n` (a reduce-scatter then an all-gather), all-to-all `R (n-1)/n`,
collective-permute `R`; n the size of the collective's device group. The TPU compiler writes a
reduce-scatter as an all-reduce fused with the slice of each device's shard, in a fusion
computation named `all-reduce-scatter*`: such an all-reduce counts as the reduce-scatter it
is, `R (n-1)/n` of its result R.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from typing import Any

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
                "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
                "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5}
_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$")
_ARRAY = re.compile(r"\b([a-z]+\d*[a-z\d]*)\[([\d,]*)\]")
_CALLS = re.compile(r"\b(?:calls|body|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_FUSED_REDUCE_SCATTER = re.compile(r"all-reduce-scatter\b")
_CHAIN = re.compile(r'chain_id="(\d+)"')


@dataclasses.dataclass
class _Instruction:
    name: str
    shape: str
    opcode: str
    rest: str


def _split(line: str) -> _Instruction | None:
    """An instruction line as (name, result shape, opcode, operands and attributes)."""
    match = _INSTRUCTION.match(line)
    if match is None:
        return None
    name, text = match.groups()
    if text.startswith("("):  # a tuple shape: up to its matching parenthesis
        depths = itertools.accumulate({"(": 1, ")": -1}.get(char, 0) for char in text)
        end = next(i for i, depth in enumerate(depths) if depth == 0) + 1
        shape, text = text[:end], text[end:].lstrip()
    else:
        shape, _, text = text.partition(" ")
    opcode, _, rest = text.partition("(")
    return _Instruction(name, shape, opcode.strip(), rest)


def parse(hlo: str) -> tuple[dict[str, list[_Instruction]], str]:
    """The computations of HLO text, by name, and the name of the entry computation."""
    computations: dict[str, list[_Instruction]] = {}
    entry, current = None, None
    for line in hlo.splitlines():
        header = _HEADER.match(line)
        if header and " = " not in line.split("(")[0]:
            current = computations.setdefault(header[1], [])
            if line.startswith("ENTRY"):
                entry = header[1]
            continue
        if line.strip() == "}":
            current = None
            continue
        if current is not None and (instruction := _split(line)):
            current.append(instruction)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return computations, entry


def shape_bytes(shape: str) -> float:
    """Bytes of an HLO shape (an array, or every array of a tuple)."""
    return sum(_DTYPE_BYTES.get(dtype, 0) * math.prod(int(d) for d in dims.split(",") if d)
               for dtype, dims in _ARRAY.findall(shape))


def group_size(attributes: str, num_devices: int) -> int:
    """The number of devices in each group of a collective, from its `replica_groups` in any
    of XLA's spellings (`{{0,1},{2,3}}`, `[2,2]<=[4]`, `mesh[...] {axes}`, `{}`: all)."""
    match = re.search(r"replica_groups=\[(\d+),(\d+)\]", attributes)
    if match:
        return int(match[2])
    match = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attributes)
    if match:
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", match[1]))
        return math.prod(int(sizes[a]) for a in re.findall(r"'([^']+)'", match[2]))
    match = re.search(r"replica_groups=\{\{([^}]*)\}", attributes)
    if match:
        return len(match[1].split(","))
    return num_devices


def _trips(loop: _Instruction, computations: dict[str, list[_Instruction]],
           default: int) -> tuple[int, str]:
    """A `while` loop's trips and where they come from: "compiler", "condition" or
    "assumed" (`default`)."""
    known = _TRIPS.search(loop.rest)
    if known:
        return int(known[1]), "compiler"
    condition = re.search(r"condition=%?([\w.\-]+)", loop.rest)
    insts = computations.get(condition[1], []) if condition else []
    bounds = [int(m[1]) for i in insts if i.opcode == "constant" and re.match(r"[su]\d+\[", i.shape)
              and (m := re.match(r"\{?(-?\d+)\}?\)", i.rest))]
    if len(bounds) == 1 and any(i.opcode == "compare" for i in insts):
        return bounds[0], "condition"
    return default, "assumed"


def _received(kind: str, result_bytes: float, n: int) -> float:
    if kind == "collective-permute":
        return result_bytes
    if n <= 1:
        return 0.0
    share = {"all-gather": (n - 1) / n, "all-to-all": (n - 1) / n,
             "all-reduce": 2 * (n - 1) / n, "reduce-scatter": n - 1}[kind]
    return result_bytes * share


@dataclasses.dataclass
class Traffic:
    """A program's collectives: per kind, how many run per call and the bytes one chip
    receives per call (loops counted by their trips), and each loop that holds collectives
    with its trips, where they come from (`_trips`), its bytes per trip (nested loops' trips
    included) and, per kind, the bytes of its largest single collective."""
    counts: dict[str, int]
    bytes: dict[str, float]
    loops: list[dict[str, Any]]

    @property
    def total_bytes(self) -> float:
        return sum(self.bytes.values())


def _kind(inst: _Instruction, computation: str) -> str | None:
    """The collective kind of an instruction (None if it is none; counted on the `-done` of
    an asynchronous pair); an all-reduce in a fused all-reduce-scatter is a reduce-scatter."""
    kind = inst.opcode.removesuffix("-done")
    if kind not in KINDS or inst.opcode.endswith("-start"):
        return None
    if kind == "all-reduce" and _FUSED_REDUCE_SCATTER.match(computation):
        return "reduce-scatter"
    return kind


def _key(inst: _Instruction, computation: str, attributes: str) -> str:
    """What identifies one collective: its asynchronous chain, else its instruction."""
    chain = _CHAIN.search(attributes)
    return f"chain {chain[1]}" if chain else f"{computation}/{inst.name}"


def instructions(hlo: str) -> list[str]:
    """The kind of every collective of HLO text, each once (not by trips; a chain once)."""
    computations, _ = parse(hlo)
    kinds = {_key(inst, name, inst.rest): kind for name, insts in computations.items()
             for inst in insts if (kind := _kind(inst, name))}
    return list(kinds.values())


def traffic(hlo: str, unknown_trips: int = 1, num_devices: int | None = None) -> Traffic:
    """The collectives of compiled HLO text (`compiled.as_text()`), each `while` body
    multiplied by its trips (`unknown_trips` where neither the compiler nor the loop's
    condition tells them). `num_devices` (default: the module's `num_partitions`) sizes a
    collective over all devices."""
    if num_devices is None:
        match = re.search(r"num_partitions=(\d+)", hlo.split("\n", 1)[0])
        num_devices = int(match[1]) if match else 1
    computations, entry = parse(hlo)
    memo: dict[str, dict[str, tuple[str, float, int]]] = {}

    def one_pass(name: str, stack: tuple[str, ...] = ()) -> dict[str, tuple[str, float, int]]:
        """The collectives of one execution of computation `name`, callees included, by
        instruction, as `(kind, bytes, times run)`."""
        if name in memo:
            return memo[name]
        found: dict[str, tuple[str, float, int]] = {}
        by_name = {i.name: i for i in computations.get(name, ())}
        for inst in computations.get(name, ()):
            kind = _kind(inst, name)
            if kind:
                attributes = inst.rest
                if inst.opcode.endswith("-done"):  # the group is on its -start
                    start = re.match(r"\s*%?([\w.\-]+)", inst.rest)
                    attributes = by_name[start[1]].rest if start and start[1] in by_name else ""
                n, result = group_size(attributes, num_devices), shape_bytes(inst.shape)
                if kind != inst.opcode.removesuffix("-done"):  # a fused reduce-scatter
                    result /= n  # each device keeps 1/n
                found[_key(inst, name, attributes)] = (kind, _received(kind, result, n), 1)
            callees = _CALLS.findall(inst.rest)
            for branches in _BRANCHES.findall(inst.rest):
                callees += [b.strip().lstrip("%") for b in branches.split(",") if b.strip()]
            if (inst.opcode in KINDS or inst.opcode.removesuffix("-start") in KINDS
                    or inst.opcode.endswith(("-done", "-update"))):
                callees = []  # a reduction's computation, or the other half of an async call
            trips = _trips(inst, computations, unknown_trips)[0] if inst.opcode == "while" else 1
            for callee in callees:
                if callee in stack or callee not in computations:
                    continue
                body = inst.opcode == "while" and f"body={callee}" in inst.rest.replace("%", "")
                times = trips if body else 1
                for key, (kind, size, n) in one_pass(callee, (*stack, name)).items():
                    if key.startswith("chain ") and key in found:
                        continue  # another fusion of a chain already counted
                    found[key] = (kind, size, n * times + found.get(key, (kind, 0, 0))[2])
        memo[name] = found
        return found

    def totals(found):
        counts, sizes = dict.fromkeys(KINDS, 0), dict.fromkeys(KINDS, 0.0)
        for kind, size, n in found.values():
            counts[kind] += n
            sizes[kind] += size * n
        return counts, sizes

    counts, sizes = totals(one_pass(entry))
    loops = []
    for inst in (i for insts in computations.values() for i in insts):
        if inst.opcode != "while":
            continue
        body = re.search(r"body=%?([\w.\-]+)", inst.rest)[1]
        found = one_pass(body)
        per_trip = totals(found)[1]
        if any(per_trip.values()):
            trips, source = _trips(inst, computations, unknown_trips)
            largest = {}
            for kind, size, _ in found.values():
                largest[kind] = max(largest.get(kind, 0.0), size)
            loops.append({"name": inst.name, "trips": trips, "trips_from": source,
                          "bytes_per_trip": {k: v for k, v in per_trip.items() if v},
                          "largest": {k: v for k, v in largest.items() if v}})
    return Traffic(counts, sizes, loops)
