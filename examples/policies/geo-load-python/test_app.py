"""Unit tests of the policy's logic, natively: python3 test_app.py (needs componentize-py,
which generates the WIT types the policy imports)."""

import os
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
BINDINGS = tempfile.mkdtemp()
subprocess.run(
    ["componentize-py", "-d", os.path.join(HERE, "../../../wit"), "-w", "policy",
     "bindings", BINDINGS],
    check=True, stdout=subprocess.DEVNULL,
)
sys.path[:0] = [BINDINGS, HERE]

import app  # noqa: E402
from wit_world.imports import types  # noqa: E402

SA, US, EU, AP = range(4)
BR, DE, JP = (ord(c[0]) << 8 | ord(c[1]) for c in ("BR", "DE", "JP"))


def backend(id, region, country, weight=1, soft=10, hard=0, healthy=True):
    return types.Backend(id=id, app=0, region=region, country=country, weight=weight,
                         soft_limit=soft, hard_limit=hard, healthy=healthy)


TABLE = types.RoutingTable(
    version=1, pop_region=EU, regions=["sa", "us", "eu", "ap"], apps=["web"],
    backends=[backend("br", SA, BR), backend("de", EU, DE), backend("jp", AP, JP)],
)


def client(country=None, region=None):
    return types.Client(ip=types.IpAddress_Ipv4(0x0A000001), country=country,
                        region=region, via_proxy_protocol=False, tls=False)


def cands(*active):
    return [n for i, a in enumerate(active) for n in (i, a, 0)]


class GeoLoad(unittest.TestCase):
    def test_the_clients_country_wins(self):
        self.assertEqual(app.pick(TABLE, client(BR, SA), cands(0, 0, 0)), 0)
        self.assertEqual(app.pick(TABLE, client(JP, AP), cands(0, 0, 0)), 2)

    def test_unknown_clients_go_to_the_pops_region(self):
        self.assertEqual(app.pick(TABLE, client(), cands(0, 0, 0)), 1)

    def test_load_breaks_ties_within_a_geo_score(self):
        table = types.RoutingTable(
            version=2, pop_region=EU, regions=TABLE.regions, apps=["web"],
            backends=[backend("a", SA, BR), backend("b", SA, BR, weight=2)])
        self.assertEqual(app.pick(table, client(BR, SA), cands(1, 1)), 1)
        self.assertEqual(app.pick(table, client(BR, SA), cands(0, 0)), 0)

    def test_ineligible_backends_are_skipped_and_none_left_refuses(self):
        table = types.RoutingTable(
            version=3, pop_region=EU, regions=TABLE.regions, apps=["web"],
            backends=[backend("full", SA, BR, hard=1), backend("down", SA, BR, healthy=False)])
        self.assertEqual(app.pick(table, client(BR, SA), cands(1, 0)), None)
        self.assertEqual(app.pick(table, client(BR, SA), cands(0, 0)), 0)


if __name__ == "__main__":
    unittest.main()
