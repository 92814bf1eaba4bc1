"""The Datapath: the contract of skyguard/datapath/__init__.py, implemented over bcc, pinned maps,
`tc` and XDP netlink. The one object the daemon holds to enforce a policy.

Fail-closed decisions written here once:
- Programs are never detached by a destructor, atexit or close(): if the daemon dies, the last
  policy keeps being enforced. Only detach()/detach_all() remove them.
- Attaching replaces whatever program sits at our hook (XDP replace, `tc filter replace` at the
  same prio/handle), so a restart never opens a window.
- An attached interface whose workload is not in the active policy drops everything.
Not here: deciding what to write (compile.py) or parsing YAML (skyguard.policy).
Thread safety: one lock serialises apply_policy, learn, hold, forget and expire_learned.
"""

from __future__ import annotations

import ctypes as ct
import errno
import ipaddress
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from skyguard import config
from skyguard.datapath import abi, hooks, libbpf, loader
from skyguard.datapath.compile import Compiled, compile_policy
from skyguard.datapath.reasons import reason_name
from skyguard.errors import BadInput, DatapathError, SkyguardError
from skyguard.policy.model import Policy

# Where sg_from_vm runs: "tc" (TC ingress, the default, chosen by measurement: bpf/README.md),
# "xdp" (generic XDP) or "xdp-native".
FROM_VM_HOOKS = ("tc", "xdp", "xdp-native")
DEFAULT_FROM_VM_HOOK = os.environ.get("SKYGUARD_FROM_VM_HOOK", "tc")
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
# Maps whose keys carry the generation (sg_workload is an array whose slots carry it in the value:
# a stale slot never matches the active generation, so it needs no deletion).
GENERATION_MAPS = ("sg_ipcache", "sg_ipcache_host", "sg_policy", "sg_policy_exact", "sg_srcip")
TC_PRIO = 1  # our filters' prio/handle: `tc filter replace` at these swaps programs atomically
TC_HANDLE = 1

log = logging.getLogger("skyguard.datapath")


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise DatapathError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


class Datapath:
    def __init__(self, pin_dir: Path | None = None, from_vm_hook: str = DEFAULT_FROM_VM_HOOK,
                 defines: dict | None = None):
        if from_vm_hook not in FROM_VM_HOOKS:
            raise BadInput(f"from_vm_hook must be one of {', '.join(FROM_VM_HOOKS)}, not {from_vm_hook!r}")
        self.pin_dir = Path(pin_dir or config.PIN_DIR)
        self.from_vm_hook = from_vm_hook
        self._loaded = loader.load(self.pin_dir, defines)
        self._program_infos: dict[str, libbpf.ProgramInfo] | None = None
        self._bpf = self._loaded.bpf
        self._lock = threading.RLock()
        self.policy: Policy | None = None
        self.compiled: Compiled | None = None
        # ip -> {(zone, rule): expiry (CLOCK_MONOTONIC ns)}
        self._learned: dict = {}
        # interface name -> ifindex given by the caller of apply_policy (else resolved by name)
        self._ifindexes: dict[str, int] = {}
        self.cleanup_failures = 0  # swaps after which entries of older generations stayed (_clean_after_swap)

    # ---- maps -------------------------------------------------------------------------------
    def map(self, name: str):
        return self._bpf.get_table(name.encode())

    def _put(self, name: str, key, val) -> None:
        self.map(name)[key] = val

    @property
    def gen(self) -> int:
        return self.map("sg_config")[ct.c_uint32(0)].gen

    def _set_config(self, gen: int, flags: int) -> None:
        self._put("sg_config", ct.c_uint32(0), abi.ConfigVal(gen=gen, flags=flags))

    def set_events(self, enabled: bool) -> None:
        """Turn ring buffer events on (a consumer is running) or off."""
        cfg = self.map("sg_config")[ct.c_uint32(0)]
        flags = (cfg.flags | abi.CFG_EVENTS) if enabled else (cfg.flags & ~abi.CFG_EVENTS)
        self._set_config(cfg.gen, flags)

    # ---- policy -----------------------------------------------------------------------------
    def apply_policy(self, policy: Policy, ifindexes: dict[str, int] | None = None,
                     host_addresses=()) -> int:
        """Atomic swap: write the new generation, flip sg_config, delete the old generation.
        Interfaces are resolved in the calling thread's network namespace unless given.
        Returns the new generation."""
        with self._lock:
            compiled = compile_policy(policy, host_addresses)
            cfg = self.map("sg_config")[ct.c_uint32(0)]
            new_gen = (cfg.gen % 0xFFFFFFF0) + 1
            previous = (self.policy, self.compiled, self._ifindexes)
            self.policy, self.compiled = policy, compiled
            self._ifindexes = dict(ifindexes or {})
            try:
                for prefix, ident in compiled.ipcache.items():
                    self._write_ipcache(new_gen, prefix, ident, 0)
                self._write_policy_entries(new_gen, compiled.policy)
                for w in compiled.workloads:
                    ifindex = self._ifindex(w.interface)
                    if ifindex:
                        self._write_workload(new_gen, ifindex, w)
                self._rewrite_learned(new_gen)
            except Exception as e:
                # Nothing of the new generation was ever active: drop it, keep the old policy.
                self.policy, self.compiled, self._ifindexes = previous
                self._delete_other_gens(cfg.gen)
                if isinstance(e, SkyguardError):
                    raise
                raise DatapathError(f"writing policy {policy.name!r} into the datapath failed ({e}); "
                                    f"the previous policy stays active") from e
            try:
                self._set_config(new_gen, cfg.flags)  # the swap: one map update, done or not done
            except Exception as e:
                self.policy, self.compiled, self._ifindexes = previous
                self._delete_other_gens(cfg.gen)
                raise DatapathError(f"switching the datapath to policy {policy.name!r} failed ({e}); "
                                    f"the previous policy stays active") from e
            # The commit point: the kernel enforces `policy` from here on, so nothing after it may
            # raise (the daemon would go on naming and measuring the previous policy).
            self._clean_after_swap(new_gen)
            return new_gen

    def _clean_after_swap(self, gen: int) -> None:
        """Delete every generation but `gen` (the active one). Entries it cannot delete are inert
        (no packet matches a generation not in sg_config) but hold map space: they are logged,
        counted in cleanup_failures (skyguard_datapath_cleanup_failures_total) and deleted by the
        next swap, which deletes every generation but its own."""
        try:
            left = self._delete_other_gens(gen)
        except Exception as e:  # noqa: BLE001 - after the commit point: reported, never raised
            problem = f"{type(e).__name__}: {e}"
        else:
            problem = f"{left} entries refused" if left else ""
        if problem:
            self.cleanup_failures += 1
            log.warning("the datapath enforces generation %d, but the old generation's entries could not all be "
                        "deleted (%s); they match no packet and the next policy load deletes them", gen, problem)

    def _ifindex(self, ifname: str) -> int:
        if ifname in self._ifindexes:
            return self._ifindexes[ifname]
        try:
            return socket.if_nametoindex(ifname)
        except OSError:
            return 0

    def _write_ipcache(self, gen: int, prefix, ident: int, expires_ns: int) -> None:
        net = ipaddress.ip_network(prefix)
        plen = abi.IPCACHE_FIXED_BITS + (abi.IPV4_MAPPED_BITS + net.prefixlen if net.version == 4 else net.prefixlen)
        key = abi.IpcacheKey(prefixlen=plen, gen=gen)
        key.addr[:] = abi.addr16(net.network_address)
        # host addresses go to the hash (constant cost), shorter prefixes to the LPM trie
        table = "sg_ipcache_host" if plen == abi.IPCACHE_HOST_PREFIXLEN else "sg_ipcache"
        self._put(table, key, abi.IpcacheVal(identity=ident, prefixlen=plen, expires_ns=expires_ns))

    def _write_policy_entries(self, gen: int, entries) -> None:
        lpm, exact = self.map("sg_policy"), self.map("sg_policy_exact")
        for e in entries:
            key = abi.PolicyKey(prefixlen=abi.POLICY_FIXED_BITS + e.port_prefixlen, gen=gen,
                                direction=e.direction, proto=e.proto, zone=e.zone, identity=e.identity,
                                port=socket.htons(e.port))
            (exact if e.port_prefixlen == 16 else lpm)[key] = abi.PolicyVal(rule_id=e.rule_id, verdict=e.verdict)

    def _write_workload(self, gen: int, ifindex: int, w) -> None:
        if ifindex >= abi.MAX_IFINDEX:
            raise DatapathError(f"interface {w.interface} has ifindex {ifindex}; the datapath handles ifindexes "
                                f"below {abi.MAX_IFINDEX} (raise SG_MAX_IFINDEX in bpf/abi.h and abi.py)")
        val = abi.WorkloadVal(gen=gen, zone=w.zone, workload=w.workload)
        val.mac[:] = w.mac
        self._put("sg_workload", ct.c_uint32(abi.workload_index(ifindex, gen)), val)
        for addr in w.addresses:
            key = abi.SrcipKey(ifindex=ifindex, gen=gen)
            key.addr[:] = abi.addr16(addr)
            self._put("sg_srcip", key, ct.c_uint8(1))

    def _delete_other_gens(self, keep: int) -> int:
        """Delete the entries of every generation but `keep`. Returns how many the kernel refused
        (bcc reports any failed delete as KeyError; errno tells a refusal from one already gone)."""
        refused = 0
        for name in GENERATION_MAPS:
            table = self.map(name)
            stale = [k for k in table.keys() if k.gen != keep]
            for k in stale:
                try:
                    del table[k]
                except KeyError:
                    if ct.get_errno() != errno.ENOENT:
                        refused += 1
        return refused

    # ---- DNS learning -----------------------------------------------------------------------
    def learn(self, zone: str, rule_name: str, ips, ttl: float) -> None:
        """Open `ips` for `zone` under FQDN rule `rule_name` (its ports only) for `ttl` seconds, or
        for longer if an answer before opened them for longer under the same zone and rule (two
        names a CDN answers with one address: the VM may use it while any answer it holds says so).
        Expiry stops new flows; established ones stay in conntrack."""
        self._learn(zone, rule_name, ips, ttl, exact=False)

    def hold(self, zone: str, rule_name: str, ips, ttl: float) -> None:
        """learn(), but for exactly `ttl` seconds from now, shorter than before if need be: the DNS
        proxy gives addresses back the expiry the answers it still holds give them, once the log
        refused a later answer or the policy stopped backing one (dns/learning.py)."""
        self._learn(zone, rule_name, ips, ttl, exact=True)

    def _learn(self, zone: str, rule_name: str, ips, ttl: float, exact: bool) -> None:
        with self._lock:
            if self.policy is None:
                raise DatapathError("learn() before apply_policy(): no policy is active")
            rule = next((r for r in self.policy.rules if r.name == rule_name), None)
            if rule is None or not rule.to.fqdns:
                raise BadInput(f"rule {rule_name!r} does not exist or has no fqdns: nothing to learn for it")
            if zone not in rule.from_zones:
                raise BadInput(f"zone {zone!r} is not a source of rule {rule_name!r}")
            for ip in self.remember(zone, rule_name, ips, ttl, exact):
                self._write_learned_ip(self.gen, ip)

    def remember(self, zone: str, rule_name: str, ips, ttl: float, exact: bool = False) -> list:
        """Hold learned addresses without writing maps: a restarting daemon calls this with its
        saved DNS answers BEFORE apply_policy, so the first generation it writes already holds
        them and conntrack entries to learned addresses survive the re-check (no window). Like
        learn(), an address keeps the latest expiry any call gave it, unless `exact` (hold())."""
        expiry = time.monotonic_ns() + int(ttl * 1e9)
        out = []
        with self._lock:
            for ip in ips:
                ip = ipaddress.ip_address(ip)
                selectors = self._learned.setdefault(ip, {})
                key = (zone, rule_name)
                selectors[key] = expiry if exact else max(expiry, selectors.get(key, 0))
                out.append(ip)
        return out

    def expire_learned(self) -> int:
        """Forget expired learned selectors (the datapath already ignores them). Returns how many
        addresses were removed entirely."""
        with self._lock:
            now = time.monotonic_ns()
            return sum(self._keep_learned(ip, {k: v for k, v in self._learned[ip].items() if v > now})
                       for ip in list(self._learned))

    def forget(self, zone: str, rule_name: str, ips) -> int:
        """Close `ips` for `zone` under `rule_name` now instead of at their TTL (the DNS proxy
        evicted them: a VM over its cap of learned entries). Other zones' and rules' hold on the
        same address stays. Established flows stay in conntrack. Returns addresses removed."""
        with self._lock:
            removed = 0
            for ip in ips:
                ip = ipaddress.ip_address(ip)
                if ip in self._learned:
                    live = {k: v for k, v in self._learned[ip].items() if k != (zone, rule_name)}
                    removed += self._keep_learned(ip, live)
            return removed

    def _keep_learned(self, ip, live: dict) -> int:
        """Hold `live` selectors for ip (rewriting its entry), or none: delete it. 1 if deleted."""
        if live:
            self._learned[ip] = live
            self._write_learned_ip(self.gen, ip)
            return 0
        del self._learned[ip]
        if self.compiled is not None:
            self._delete_ipcache_host(self.gen, ip)
        return 1

    def learned(self) -> dict:
        return {str(ip): {f"{z}/{r}": exp for (z, r), exp in sel.items()} for ip, sel in self._learned.items()}

    def _write_learned_ip(self, gen: int, ip) -> None:
        rules = {r.name: r for r in self.policy.rules}
        now = time.monotonic_ns()
        live = {k: v for k, v in self._learned[ip].items() if v > now and k[1] in rules and k[0] in rules[k[1]].from_zones}
        if not live:
            return
        sels = self.compiled.static_selectors_of(ip) | {("learned", z, r) for (z, r) in live}
        ident, new_entries = self.compiled.identity_for(frozenset(sels))
        self._write_policy_entries(gen, new_entries)
        self._write_ipcache(gen, ipaddress.ip_network(ip), ident, max(live.values()))

    def _rewrite_learned(self, gen: int) -> None:
        for ip in list(self._learned):
            self._write_learned_ip(gen, ip)

    def _delete_ipcache_host(self, gen: int, ip) -> None:
        net = ipaddress.ip_network(ip)
        if net in self.compiled.ipcache:
            self._write_ipcache(gen, net, self.compiled.ipcache[net], 0)
            return
        key = abi.IpcacheKey(prefixlen=abi.IPCACHE_HOST_PREFIXLEN, gen=gen)
        key.addr[:] = abi.addr16(ip)
        try:
            del self.map("sg_ipcache_host")[key]
        except KeyError:
            pass

    # ---- attach -----------------------------------------------------------------------------
    def attach(self, ifname: str) -> tuple[int, dict]:
        """Enforce on `ifname` (in the calling thread's network namespace): from_vm at the chosen
        hook, sg_to_vm at TC egress. Replaces our programs if already attached (no window).
        Returns the interface's index and what is attached there, read back by that index."""
        with self._lock:
            ifindex = self._ifindex(ifname)
            if not ifindex:
                raise DatapathError(f"interface {ifname} does not exist in this network namespace")
            if self.compiled is not None:
                w = next((w for w in self.compiled.workloads if w.interface == ifname), None)
                if w is None:
                    raise BadInput(f"interface {ifname} belongs to no workload of policy {self.policy.name!r}")
                self._write_workload(self.gen, ifindex, w)
            _run("tc", "qdisc", "replace", "dev", ifname, "clsact")
            self._tc_replace(ifname, "egress", self._loaded.to_vm)
            if self.from_vm_hook == "tc":
                self._tc_replace(ifname, "ingress", self._loaded.from_vm_tc)
                self._remove_xdp(ifname)
            else:
                from bcc import BPF

                flags = XDP_FLAGS_SKB_MODE if self.from_vm_hook == "xdp" else XDP_FLAGS_DRV_MODE
                try:
                    BPF.attach_xdp(ifname.encode(), self._loaded.from_vm_xdp, flags)
                except Exception as e:
                    raise DatapathError(f"attaching XDP to {ifname} failed: {e}") from e
                _run("tc", "filter", "del", "dev", ifname, "ingress", "prio", str(TC_PRIO), check=False)
            with IPRoute() as ipr:
                self._remove_foreign_filters(ifname, hooks.read_hooks(ipr, ifindex))
                return ifindex, hooks.read_hooks(ipr, ifindex).describe()

    def _remove_foreign_filters(self, ifname: str, found: hooks.Hooks) -> None:
        """Delete every TC filter at our hooks that is not ours: one beside ours could pass or
        redirect packets first (this is how attach() repairs that kind of tampering)."""
        ours_at = {"egress", "ingress"} if self.from_vm_hook == "tc" else {"egress"}
        for where, filters in (("ingress", found.ingress), ("egress", found.egress)):
            for f in filters:
                if where in ours_at and f.kind == "bpf" and (f.prio, f.handle) == (TC_PRIO, TC_HANDLE):
                    continue
                # Another priority goes whole; at ours (same kind there), only that handle.
                target = ["prio", str(f.prio)] if f.prio != TC_PRIO else ["prio", str(f.prio), "handle", hex(f.handle), f.kind]
                _run("tc", "filter", "del", "dev", ifname, where, *target, check=False)

    def _tc_replace(self, ifname: str, where: str, fn) -> None:
        # tc takes a program by pinned path: pin under a private name, attach, unpin (the filter
        # keeps its own reference). bpffs refuses names starting with a dot.
        tmp = self.pin_dir / f"attach-{os.getpid()}-{threading.get_ident()}-{where}"
        if tmp.exists():
            tmp.unlink()
        libbpf.pin(fn.fd, tmp)
        try:
            _run("tc", "filter", "replace", "dev", ifname, where, "prio", str(TC_PRIO), "handle",
                 str(TC_HANDLE), "bpf", "direct-action", "object-pinned", str(tmp))
        finally:
            tmp.unlink()

    def _remove_xdp(self, ifname: str) -> None:
        _run("ip", "link", "set", "dev", ifname, "xdpgeneric", "off", check=False)
        _run("ip", "link", "set", "dev", ifname, "xdpdrv", "off", check=False)

    def detach(self, ifname: str) -> None:
        link = _run("ip", "-j", "-d", "link", "show", "dev", ifname, check=False)
        if link.returncode != 0:
            return  # gone: the kernel removed its programs with it
        self._remove_xdp(ifname)
        _run("tc", "qdisc", "del", "dev", ifname, "clsact", check=False)

    def detach_all(self) -> list[str]:
        names = list(self.attached())
        for name in names:
            self.detach(name)
        return names

    def attached(self) -> dict:
        """Per interface (this network namespace) carrying a skyguard program: the ids, names and
        tags of the programs at its hooks (for status and attest). Netlink, no subprocess."""
        out: dict = {}
        with IPRoute() as ipr:
            for link in ipr.get_links():
                try:
                    info = hooks.read_hooks(ipr, link["index"], link).describe()
                except NetlinkError:
                    continue  # gone meanwhile
                if any(str(p.get("name") or "").startswith("sg_") for p in info.values()):
                    out[link.get_attr("IFLA_IFNAME")] = info
        return out

    def sync(self) -> dict:
        """Attach to every workload interface of the active policy that exists here and is not
        carrying this Datapath's programs; report the ones missing. The daemon calls it at start,
        on netlink link events and periodically (interfaces appear when VMs start)."""
        if self.compiled is None:
            raise DatapathError("sync() before apply_policy(): no policy is active")
        problems = self.verify()
        done, missing = [], []
        for w in self.compiled.workloads:
            if not self._ifindex(w.interface):
                missing.append(w.interface)
            elif w.interface in problems:
                self.attach(w.interface)
                done.append(w.interface)
        return {"attached": done, "missing": missing}

    def program_ids(self) -> dict[str, int]:
        """Kernel ids of this Datapath's programs, by name."""
        return {name: info.id for name, info in self.program_infos().items()}

    def program_infos(self) -> dict[str, libbpf.ProgramInfo]:
        """Id, tag and name of this Datapath's programs (as bpftool, ip and tc show them). Read
        once: the programs are loaded once per Datapath, and the watchdog asks every second."""
        if self._program_infos is None:
            loaded = self._loaded
            self._program_infos = {name: libbpf.program_info(fn.fd) for name, fn in (
                ("sg_from_vm", loaded.from_vm_xdp), ("sg_from_vm_tc", loaded.from_vm_tc), ("sg_to_vm", loaded.to_vm))}
        return self._program_infos

    def verify(self) -> dict[str, str]:
        """Watchdog check: for every workload interface present, what is wrong at its hooks (our
        programs missing or replaced, or anything else attached beside them). Empty when all is
        ours. Netlink only, no subprocess: cheap enough to run every second."""
        if self.compiled is None:
            return {}
        ours = self.program_ids()
        problems = {}
        with IPRoute() as ipr:
            for w in self.compiled.workloads:
                index = self._ifindex(w.interface)
                if not index:
                    continue
                try:
                    problem = self._problem(hooks.read_hooks(ipr, index), ours)
                except NetlinkError:
                    continue  # gone meanwhile: the daemon forgets it on its next pass
                if problem:
                    problems[w.interface] = problem
        return problems

    def _problem(self, found: hooks.Hooks, ours: dict[str, int]) -> str:
        tc = self.from_vm_hook == "tc"
        ingress = [f.program_id for f in found.ingress]
        egress = [f.program_id for f in found.egress]
        from_vm_ours = ours["sg_from_vm_tc"] in ingress if tc else found.xdp == ours["sg_from_vm"]
        if not from_vm_ours or ours["sg_to_vm"] not in egress:
            nothing = not egress or (not ingress if tc else found.xdp is None)
            return "not attached" if nothing else "programs are not this skyguard's (replaced or tampered with)"
        expected_ingress, expected_xdp = ([ours["sg_from_vm_tc"]], None) if tc else ([], ours["sg_from_vm"])
        if ingress != expected_ingress or egress != [ours["sg_to_vm"]] or found.xdp != expected_xdp:
            return "a program or filter that is not skyguard's is attached beside it"
        return ""

    # ---- reading ----------------------------------------------------------------------------
    def _zone_names(self) -> dict[int, str]:
        names = {0: "unknown"}
        if self.compiled:
            names.update({i: z for z, i in self.compiled.zone_ids.items()})
        return names

    def counters(self) -> dict:
        zones = self._zone_names()
        out: dict = {"traffic": [], "drops": [], "events_lost": 0}
        for idx, packets, nbytes in libbpf.nonzero_per_cpu_counters(self.map("sg_traffic")):
            zone, direction, verdict = abi.split_traffic_index(idx)
            out["traffic"].append({"zone": zones.get(zone, str(zone)), "direction": abi.DIRECTIONS[direction],
                                   "verdict": abi.VERDICTS.get(verdict, str(verdict)),
                                   "packets": packets, "bytes": nbytes})
        for idx, packets, nbytes in libbpf.nonzero_per_cpu_counters(self.map("sg_drops")):
            zone, direction, reason = abi.split_drop_index(idx)
            out["drops"].append({"zone": zones.get(zone, str(zone)), "direction": abi.DIRECTIONS[direction],
                                 "reason": reason_name(reason), "packets": packets, "bytes": nbytes})
        lost = self.map("sg_ev_lost")
        out["events_lost"] = sum(int(v) for v in lost[ct.c_int(0)])
        return out

    def flows(self) -> list[dict]:
        zones = self._zone_names()
        rules = {i: n for n, i in (self.compiled.rule_ids.items() if self.compiled else ())}
        now = time.monotonic_ns()
        out = []
        for k, v in self.map("sg_ct").items():
            if v.expires_ns <= now:
                continue
            out.append({"ifindex": k.ifindex, "proto": k.proto, "src": str(abi.addr_from16(bytes(k.saddr))),
                        "dst": str(abi.addr_from16(bytes(k.daddr))), "sport": socket.ntohs(k.sport),
                        "dport": socket.ntohs(k.dport), "zone": zones.get(v.zone, str(v.zone)),
                        "direction": abi.DIRECTIONS[v.direction], "state": abi.CT_STATES.get(v.state, v.state),
                        "rule": rules.get(v.rule_id, str(v.rule_id)),
                        "packets": v.packets, "bytes": v.bytes})
        return out

    def active_flows_by_zone(self) -> dict[str, int]:
        """Unexpired conntrack entries per zone, from batch reads: what a metrics scrape asks,
        cheap at 100k flows (flows() builds a record per entry)."""
        zones = self._zone_names()
        now = time.monotonic_ns()
        out: dict[str, int] = {}
        for _, (expires_ns, _packets, _bytes, _gen, _rule, zone, *_rest) in libbpf.dump(
                self.map("sg_ct"), abi.CT_KEY.size, abi.CT_VAL_PADDED):
            if expires_ns > now:
                name = zones.get(zone, str(zone))
                out[name] = out.get(name, 0) + 1
        return out

    def occupancy(self) -> dict[str, int]:
        return {name: libbpf.count(self.map(name)) for name in abi.PINNED_MAPS}

    def events(self):
        """The ring buffer table (bcc); flowlog/ring.py reads it through its map_fd."""
        return self._bpf[b"sg_events"]

    def close(self) -> None:
        """Drop Python handles. Pinned maps and attached programs stay (fail closed)."""
        try:
            self._bpf.cleanup()
        except Exception:
            pass

    @staticmethod
    def remove_pins(pin_dir: Path | None = None) -> None:
        """Forget all pinned state (`skyguard down`, after detach_all)."""
        shutil.rmtree(Path(pin_dir or config.PIN_DIR), ignore_errors=True)
