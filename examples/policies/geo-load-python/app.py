"""The default policy in Python: score = geo_score * 100 + (active / soft_limit) / weight,
lowest wins; unhealthy backends and backends at their hard limit are skipped; ties go to
the earlier candidate. It decides as the Rust default (policies/geo-load) does, which the
proxy's tests check on live traffic.

The proxy calls `set_table` once per routing-table version and `pick_backend` for each
new client (see wit/policy.wit). Everything the policy keeps between calls lives in this
module, per instance.
"""

from typing import List, Optional

import wit_world
from wit_world.imports import types

_table: Optional[types.RoutingTable] = None


def geo_score(backend: types.Backend, client: types.Client, pop_region: int) -> int:
    """0: the client's country, 1: its region, 2: this POP's region, 3: elsewhere."""
    if client.country is not None and client.country == backend.country:
        return 0
    if client.region is not None and client.region == backend.region:
        return 1
    if backend.region == pop_region:
        return 2
    return 3


def eligible(backend: types.Backend, active: int) -> bool:
    return backend.healthy and (backend.hard_limit == 0 or active < backend.hard_limit)


def score(backend: types.Backend, active: int, client: types.Client, pop_region: int) -> float:
    load = active / max(backend.soft_limit, 1) / max(backend.weight, 1)
    return geo_score(backend, client, pop_region) * 100.0 + load


def pick(table: types.RoutingTable, client: types.Client, candidates: List[int]) -> Optional[int]:
    """The position of the best candidate; `candidates` is (index, active, rtt) triples."""
    best, best_score = None, 0.0
    for position in range(len(candidates) // 3):
        index, active = candidates[3 * position], candidates[3 * position + 1]
        backend = table.backends[index]
        if not eligible(backend, active):
            continue
        s = score(backend, active, client, table.pop_region)
        if best is None or s < best_score:
            best, best_score = position, s
    return best


class WitWorld(wit_world.WitWorld):
    def set_table(self, table: types.RoutingTable) -> None:
        global _table
        _table = table

    def pick_backend(
        self, app: Optional[int], client: types.Client, candidates: List[int]
    ) -> Optional[int]:
        if _table is None:
            return None
        return pick(_table, client, candidates)
