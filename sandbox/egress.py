"""Egress control for the sandbox bridge: one nftables table of thaw's per bridge (`inet thaw-<bridge>`).

Egress off (the default): a sandbox reaches the bridge's own address and nothing else.
    forward   iifname <bridge> reject          nothing from a sandbox is routed anywhere
              oifname <bridge> drop            nor anything routed to one
    input     iifname <bridge> ip daddr != <gateway> reject
                                               the host's other addresses are "beyond" too
Egress on: IPv4 forwarding is turned on and the subnet is masqueraded out.
    forward   iifname <bridge> accept
              oifname <bridge> ct state established,related accept
              oifname <bridge> drop            replies only: no connection into a sandbox
    postrouting (nat)  ip saddr <subnet> oifname != <bridge> masquerade

Some facts about netfilter this rests on. Every table's base chains on a hook see every packet,
in priority order, and a packet goes on only if *every* one of them accepts it: our drop is final
whatever other tables say, but our accept does not overrule another table's drop (a host firewall
whose forward policy is drop must let the subnet through itself). Refusals are `reject` (an ICMP
"administratively prohibited") rather than a silent drop, so a guest's connect fails at once
instead of hanging until its timeout. The table goes in one transaction (add, delete, add: a table
a crashed thaw left is replaced whole) and is deleted when the network is torn down.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from native.nftables import Nftables, NftablesError
from sandbox.errors import SandboxError

FAMILY = "inet"
REJECT: dict[str, Any] = {"reject": {"type": "icmpx", "expr": "admin-prohibited"}}


def table_name(bridge: str) -> str:
    return f"thaw-{bridge}"


def _is(key: str, value: str, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": {"meta": {"key": key}}, "right": value}}


def _ip(field: str, value: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": {"payload": {"protocol": "ip", "field": field}}, "right": value}}


class Egress:
    """thaw's nftables table for one bridge and subnet."""

    def __init__(self, bridge: str, net: ipaddress.IPv4Network, gateway: ipaddress.IPv4Address) -> None:
        self.bridge, self.net, self.gateway = bridge, net, gateway
        self.table = {"family": FAMILY, "name": table_name(bridge)}

    def install(self, allow: bool) -> None:
        """Put the table in place (replacing one of the same name); SandboxError if nftables refuses."""
        commands = [{"add": {"table": self.table}}, {"delete": {"table": self.table}}, {"add": {"table": self.table}}]
        commands += self._allowing() if allow else self._refusing()
        self._run(commands, "installing")

    def remove(self) -> None:
        """Delete the table (nothing happens if it is not there)."""
        self._run([{"add": {"table": self.table}}, {"delete": {"table": self.table}}], "removing")

    def _refusing(self) -> list[dict[str, Any]]:
        return [
            self._chain("forward", "filter", "forward", 0),
            self._rule("forward", _is("iifname", self.bridge), REJECT),
            self._rule("forward", _is("oifname", self.bridge), {"drop": None}),
            self._chain("input", "filter", "input", 0),
            self._rule("input", _is("iifname", self.bridge), _ip("daddr", str(self.gateway), "!="), REJECT),
        ]

    def _allowing(self) -> list[dict[str, Any]]:
        replies = {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}}
        subnet = {"prefix": {"addr": str(self.net.network_address), "len": self.net.prefixlen}}
        return [
            self._chain("forward", "filter", "forward", 0),
            self._rule("forward", _is("iifname", self.bridge), {"accept": None}),
            self._rule("forward", _is("oifname", self.bridge), replies, {"accept": None}),
            self._rule("forward", _is("oifname", self.bridge), {"drop": None}),
            self._chain("postrouting", "nat", "postrouting", 100),
            self._rule("postrouting", _ip("saddr", subnet), _is("oifname", self.bridge, "!="), {"masquerade": None}),
        ]

    def _chain(self, name: str, kind: str, hook: str, priority: int) -> dict[str, Any]:
        chain = {**self.table, "table": self.table["name"], "name": name}
        return {"add": {"chain": {**chain, "type": kind, "hook": hook, "prio": priority, "policy": "accept"}}}

    def _rule(self, chain: str, *expressions: dict[str, Any]) -> dict[str, Any]:
        return {
            "add": {"rule": {"family": FAMILY, "table": self.table["name"], "chain": chain, "expr": list(expressions)}}
        }

    def _run(self, commands: list[dict[str, Any]], doing: str) -> None:
        try:
            with Nftables() as nft:
                nft.run(commands)
        except NftablesError as e:
            raise SandboxError(f"{doing} nftables table {FAMILY} {self.table['name']}: {e}") from e


def thaw_tables() -> list[str]:
    """Names of the nftables tables of thaw's that exist now (for leak checks and clean-up)."""
    with Nftables() as nft:
        listed = nft.run([{"list": {"tables": {}}}]).get("nftables", [])
    tables = [t["table"] for t in listed if "table" in t]
    return sorted(t["name"] for t in tables if t["family"] == FAMILY and t["name"].startswith("thaw-"))
