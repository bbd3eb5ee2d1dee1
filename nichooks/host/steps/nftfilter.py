"""A NIC's nftables filter as one journaled step (bridged and routed modes), with its
undo, check and rebuild, the agent's bulk audit and the sweep of orphans.

The step is one transaction: the shared table, base chain and map (made if missing),
the NIC's chain `nic-<key>` with every rule, and the map element sending the tap's
packets there. It runs before the tap can carry anything (bridged: before it joins
the bridge; routed: before it is up), so a guest is never plugged unfiltered.

Everything is found again by name: the chain by the journal key, the element by the
tap name *and* its target chain. Undo deletes the element only while it still points
at our chain (a newer plug on the same tap name has its own), then the chain, then
the table when no NIC is left in it. That last step and every install take one host
lock, so a plug never loses its table to a concurrent ifdown of the last other NIC.
A sweep deletes the chains of NICs no journal claims, and the table with the last.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nichooks.engine.actions import Action
from nichooks.engine.journal import KEY, Record, Status
from nichooks.engine.records import checks, rebuilds, undoes
from nichooks.host import nftrules as rules
from nichooks.host.nft import NftError
from nichooks.host.nftrules import MAP, TABLE, Filter
from nichooks.model.nic import Nic

if TYPE_CHECKING:
    from nichooks.engine.journal import Journal
    from nichooks.engine.store import Store
    from nichooks.host.host import Host
    from nichooks.log import HookLog
    from nichooks.settings import Settings

KIND = "nft.filter"
FAMILY = {"bridged": "bridge", "routed": "inet"}
LOCK_TIMEOUT = 30.0


@contextmanager
def table_lock(net: Host) -> Iterator[None]:
    """The host's nftables lock: held only around one transaction, never while waiting
    for another lock, so it cannot deadlock with the NIC locks."""
    from filelock import FileLock

    locks = net.settings.state_dir / "locks"
    locks.mkdir(mode=0o755, parents=True, exist_ok=True)
    with FileLock(str(locks / "nftables.lock"), timeout=LOCK_TIMEOUT, mode=0o644):
        yield


def nic_filter(nic: Nic, family: str, net: Host) -> Filter | None:
    """The NIC's filter under the host's setting and its tags; None when it is off."""
    from nichooks.model.policy import filter_policy

    policy = filter_policy(nic, net.settings.antispoof)
    if policy.level == "off":
        return None
    return Filter(family=family, chain=rules.chain_name(nic.key), ifname=nic.tap, mac=policy.mac,
                  level=policy.level,
                  ipv4=tuple(ipaddress.IPv4Address(a) for a in policy.ipv4),
                  ipv6=tuple(ipaddress.IPv6Address(a) for a in policy.ipv6),
                  trunks=nic.vlan.trunks if nic.vlan and family == "bridge" else ())


@dataclass(frozen=True)
class NicFilter:
    filter: Filter
    kind: str = KIND

    def describe(self) -> str:
        f = self.filter
        allowed = f"MAC {f.mac}"
        if f.filters_ips:
            allowed += ", sources " + " ".join(str(a) for a in (*f.ipv4, *f.ipv6))
        if f.trunks:
            allowed += ", VLANs " + ",".join(str(v) for v in f.trunks)
        return f"filter {f.ifname} in nftables {f.family} {TABLE} ({f.level}: {allowed})"

    def as_data(self) -> dict[str, Any]:
        f = self.filter
        return {"step": "nft.filter", "family": f.family, "chain": f.chain, "ifname": f.ifname,
                "level": f.level, "mac": f.mac, "ipv4": [str(a) for a in f.ipv4],
                "ipv6": [str(a) for a in f.ipv6], "trunks": list(f.trunks)}

    def prepare(self, net: Host) -> Record:
        f = self.filter
        return Record(kind=self.kind, step=self.describe(), undo={
            "family": f.family, "chain": f.chain, "ifname": f.ifname, "digest": f.digest(),
            "rules": len(f.rules())})

    def apply(self, net: Host) -> dict[str, Any]:
        nft = net.nft()
        with table_lock(net):
            try:
                nft.run(rules.install(self.filter, replace_element=False))
            except NftError as exc:
                if "File exists" not in exc.text:
                    raise
                # The tap name's element points at another NIC's chain: a plug whose
                # journal is gone. Ours replaces it in the same transaction.
                nft.run(rules.install(self.filter, replace_element=True))
        return {"rules": len(self.filter.rules())}

    def verify(self, net: Host) -> str | None:
        """The NIC's chain, its element, the shared and base chains: a repair re-applies
        the step when any of them does not read back (an emptied shared chain would
        let the NIC's packets through)."""
        f = self.filter
        return _differs(net, f.family, f.chain, f.ifname, f.digest(), len(f.rules()))

    def verify_applied(self, net: Host) -> str | None:
        """Right after this process applied it: the NIC's chain. It came in one
        transaction with the element and the shared chains, which either all applied
        or none did; their listings grow with the number of NICs."""
        f = self.filter
        return _chain_differs(net, f.family, f.chain, f.digest(), len(f.rules()))


def _chain_differs(net: Host, family: str, chain: str, digest: str, count: int) -> str | None:
    found = net.nft().chain_rules(family, TABLE, chain)
    if found is None:
        return f"nftables chain {family} {TABLE} {chain} is missing"
    if [r.get("comment") for r in found] != [f"nichooks {digest}"] * count:
        return f"nftables chain {family} {TABLE} {chain} has other rules than ours"
    return None


def _differs(net: Host, family: str, chain: str, ifname: str, digest: str,
             count: int) -> str | None:
    wrong = _chain_differs(net, family, chain, digest, count)
    if wrong is not None:
        return wrong
    target = (net.nft().map_elements(family, TABLE, MAP) or {}).get(ifname)
    if target != chain:
        return f"{ifname} is not sent to {chain} in nftables {family} {TABLE} map {MAP}"
    return _shared_differs(net, family)


def _shared_differs(net: Host, family: str) -> str | None:
    """What is wrong with the base chain or the chains every NIC shares, if anything:
    a NIC's chain ends in `goto guest`, so an emptied shared chain would let its
    packets through."""
    nft = net.nft()
    wanted = {name: len(chain_rules) for name, chain_rules in rules.shared_rules(family).items()}
    comment = "nichooks " + rules.shared_digest(family)
    for name, count in wanted.items():
        found = nft.chain_rules(family, TABLE, name)
        if found is None or [r.get("comment") for r in found] != [comment] * count:
            return f"nftables chain {family} {TABLE} {name} is not ours as installed"
    base = nft.chain_rules(family, TABLE, rules.BASE_CHAIN)
    if base is None or [r.get("comment") for r in base] != [rules.DISPATCH]:
        return f"nftables chain {family} {TABLE} {rules.BASE_CHAIN} does not dispatch to {MAP}"
    return None


@undoes(KIND)
def undo_filter(net: Host, undo: dict[str, Any]) -> None:
    delete_chain(net, str(undo["family"]), str(undo["chain"]))


def delete_chain(net: Host, family: str, chain: str) -> None:
    """Delete the chain and every element pointing at it, then the table if no NIC is
    left in it. Under the host lock: a plug replaces an element of the same tap name
    and adds its chain in one transaction under the same lock, so what is read here is
    what is deleted."""
    nft = net.nft()
    with table_lock(net):
        elements = nft.map_elements(family, TABLE, MAP)
        if elements is None:
            return  # the table is gone (a flushed ruleset), and the chain with it
        cmds = [{"delete": {"element": rules.element(family, name)}}
                for name, target in sorted(elements.items()) if target == chain]
        cmds += [{"add": {"chain": rules.obj(family, name=chain)}}]
        cmds += rules.remove(family, chain, None)
        nft.run(cmds)
        if all(target == chain for target in elements.values()):
            _drop_unused_table(net, family)


def _drop_unused_table(net: Host, family: str) -> None:
    """Delete our table when no NIC's chain is left in it (hold the host lock)."""
    names = net.nft().chains(family, TABLE)
    if names is not None and not any(n.startswith(rules.CHAIN_PREFIX) for n in names):
        net.nft().run([{"delete": {"table": {"family": family, "name": TABLE}}}])


@checks(KIND)
def filter_present(net: Host, undo: dict[str, Any]) -> bool:
    return _differs(net, str(undo["family"]), str(undo["chain"]), str(undo["ifname"]),
                    str(undo["digest"]), int(undo["rules"])) is None


@rebuilds(KIND)
def rebuild_filter(undo: dict[str, Any], nic: Nic, net: Host) -> NicFilter | None:
    found = nic_filter(nic, str(undo["family"]), net)
    return NicFilter(found) if found is not None and found.chain == undo["chain"] else None


def audit(journals: list[Journal], net: Host, family: str) -> set[str]:
    """Keys of the journals whose filter is gone: one map listing and the shared chains
    per family, however many NICs there are (a flushed ruleset, a deleted table,
    element or shared chain)."""
    wanted = {j.key: (str(r.undo["ifname"]), str(r.undo["chain"]))
              for j in journals for r in j.records
              if r.kind == KIND and r.status != Status.FAILED and r.undo.get("family") == family}
    if not wanted:
        return set()
    elements = net.nft().map_elements(family, TABLE, MAP)
    if elements is None or _shared_differs(net, family) is not None:
        return set(wanted)
    return {key for key, (ifname, chain) in wanted.items() if elements.get(ifname) != chain}


def _claimed(store: Store) -> set[str]:
    return set(store.journal_keys()) | store.quarantined_keys()


def sweep(store: Store, net: Host, settings: Settings, family: str, *, dry_run: bool,
          log: HookLog) -> list[Action]:
    """Chains (and their elements) of NICs no journal claims, in our table only. A chain
    whose tap still exists is kept: a guest may be behind it, and a filter left in
    place fails closed."""
    from nichooks.engine.locks import BUSY_TIMEOUT, locked
    from nichooks.errors import LockTimeout

    try:
        nft = net.nft()
        names = nft.chains(family, TABLE)
        elements = nft.map_elements(family, TABLE, MAP) or {}
    except Exception as exc:  # NftError, or no binding: report, do not abort the sweep
        return [Action(f"nftables {family} {TABLE}", "failed", f"cannot read nftables: {exc}",
                       ok=False)]
    if names is None:
        return []
    actions: list[Action] = []
    claimed = _claimed(store)
    for chain in sorted(n for n in names if n.startswith(rules.CHAIN_PREFIX)):
        key = chain[len(rules.CHAIN_PREFIX):]
        if not KEY.fullmatch(key) or key in claimed:
            continue
        live = sorted(name for name, target in elements.items()
                      if target == chain and net.netlink.find(name) is not None)
        what = f"nftables {family} {TABLE} {chain}"
        if live:
            actions.append(Action(what, "kept", f"no journal for {key}, but {live[0]} exists; "
                                  "left alone", ok=False))
            continue
        if dry_run:
            actions.append(Action(what, "orphan-filter", f"would delete: no journal for {key}"))
            continue
        try:
            with locked(store, key, min(settings.lock_timeout, BUSY_TIMEOUT)):
                if key in _claimed(store):
                    continue
                delete_chain(net, family, chain)
        except LockTimeout:
            actions.append(Action(what, "busy", f"a hook holds its NIC {key}; left for the next "
                                  "sweep", ok=False))
            continue
        except NftError as exc:
            actions.append(Action(what, "failed", f"cannot delete orphan filter: {exc}", ok=False))
            continue
        log.info("sweep", chain=chain, owner=key, result="orphan filter deleted")
        actions.append(Action(what, "orphan-filter", f"deleted: no journal for {key}"))
    if not dry_run and not any(n.startswith(rules.CHAIN_PREFIX) for n in names):
        with table_lock(net):
            _drop_unused_table(net, family)  # an empty table a crash left
    return actions
