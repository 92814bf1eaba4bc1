#!/usr/bin/env python3
"""from-vm-hook: where should sg_from_vm run, per interface kind? Each kind is measured with no
filter (the anchor) and with sg_from_vm at TC ingress, generic XDP and native XDP (sg_to_vm at TC
egress in all three), the anchor re-measured in every round because the machine is shared.

Kinds (`--kinds`, default `tap,guest`):
  tap    a tap fed from the host side the way QEMU feeds it: a small C writer (compiled here with
         gcc) writes 64-byte Ethernet frames into the tap's file descriptor, so every frame enters
         the host through the tap's receive path, where the hooks sit (tun runs native XDP on
         written frames before it builds an skb). No guest: the figure is the host's cost per
         frame, frames/s for an allowed flow, a denied flood, and new flows (source port +1 per
         frame), median of ROUNDS rounds.
  guest  one real guest (the lab's QEMU image, KVM if it boots here, else software emulation) on
         a tap, iperf3 from the guest to a namespace behind the host: allowed TCP, also with a
         denied 64-byte UDP flood from the same guest.
  veth   the earlier measurement: iperf3 between two namespaces over veths.

Everything is private (names sg-hk<pid>*), removed at the end. Progress on stderr, one JSON line
last on stdout, also written to bench/results/from-vm-hook.json. The choice it informs is in
bpf/README.md.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from skyguard.datapath import progrun  # noqa: E402
from skyguard.policy.model import Destination, Policy, PortRange, Rule, Workload, Zone  # noqa: E402

TAG = f"sg-hk{os.getpid() % 10000}"
HOST, A, B = f"{TAG}h", f"{TAG}a", f"{TAG}b"
SECONDS = int(os.environ.get("SG_BENCH_SECONDS", "5"))
ROUNDS = int(os.environ.get("SG_BENCH_ROUNDS", "3"))
HOOKS = ("tc", "xdp", "xdp-native")
GW4 = "169.254.1.1"
ALLOWED_PORT, DENIED_PORT = 5201, 9
# name: (namespace, host-side interface, MAC, address)
VMS = {"a": (A, f"sgt{os.getpid() % 10000}a", "02:00:00:00:0a:02", "10.11.0.2"),
       "b": (B, f"sgt{os.getpid() % 10000}b", "02:00:00:00:0b:02", "10.12.0.2")}

# The host side of QEMU's NIC without a guest: writes one frame over and over into a tap for a
# number of seconds (optionally bumping the UDP source port, a new flow per frame) and prints
# "frames errors seconds cpu-seconds". A write returns once the kernel has taken the frame in (tun
# runs native XDP there, then hands the skb to the stack, whose receive path runs in the same
# system call as a softirq on the way out), so the writer's CPU time per frame is the host's cost
# of receiving it: a figure other jobs on a shared machine barely move, unlike frames per second.
TAPFEED_C = r"""
#include <fcntl.h>
#include <linux/if_tun.h>
#include <net/if.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
  if (argc != 5) { fprintf(stderr, "usage: tapfeed IFNAME HEXFRAME SECONDS NEWFLOWS\n"); return 2; }
  int fd = open("/dev/net/tun", O_RDWR);
  struct ifreq ifr; memset(&ifr, 0, sizeof ifr);
  ifr.ifr_flags = IFF_TAP | IFF_NO_PI; strncpy(ifr.ifr_name, argv[1], IFNAMSIZ - 1);
  if (fd < 0 || ioctl(fd, TUNSETIFF, &ifr) < 0) { perror("tap"); return 1; }
  unsigned char f[2048]; size_t n = strlen(argv[2]) / 2;
  for (size_t i = 0; i < n && i < sizeof f; i++) sscanf(argv[2] + 2 * i, "%2hhx", &f[i]);
  double secs = atof(argv[3]); int newflows = atoi(argv[4]);
  unsigned long long sent = 0, errs = 0; unsigned short port = 10000;
  struct timespec t0, t; clock_gettime(CLOCK_MONOTONIC, &t0);
  for (;;) {
    for (int k = 0; k < 1024; k++) {
      if (newflows) { port = port >= 60000 ? 10000 : port + 1; f[34] = port >> 8; f[35] = port & 0xff; }
      if (write(fd, f, n) == (ssize_t)n) sent++; else errs++;
    }
    clock_gettime(CLOCK_MONOTONIC, &t);
    double el = (t.tv_sec - t0.tv_sec) + (t.tv_nsec - t0.tv_nsec) / 1e9;
    if (el >= secs) {
      struct rusage ru; getrusage(RUSAGE_SELF, &ru);
      double cpu = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
      printf("%llu %llu %.6f %.6f\n", sent, errs, el, cpu); return 0;
    }
  }
}
"""


def log(msg):
    print(f"[from-vm-hook] {msg}", file=sys.stderr, flush=True)


def sh(*cmd, check=True):
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def in_ns(ns: str, *cmd: str) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{ns}", "--", *cmd]


def policy(hosts_b_port: int = ALLOWED_PORT) -> Policy:
    zones = {}
    for vm, (_ns, host_if, mac, addr) in VMS.items():
        zones[vm] = Zone(vm, (Workload(vm, vm, host_if, mac, (ipaddress.ip_address(addr),)),))
    rules = (Rule("allowed", "allow", ("a",), Destination(zones=("b",)),
                  (PortRange("tcp", hosts_b_port, hosts_b_port), PortRange("udp", hosts_b_port, hosts_b_port))),)
    return Policy("hook-bench", zones, {}, rules)


# ---- the network: a host namespace routing between VM a (a tap, or a veth) and namespace b ----

def build(a_kind: str) -> None:
    """a_kind: "tap" (a persistent tap in the host namespace, for the feeder), "veth" (namespace
    a), or "guest" (nothing: QEMU creates the tap and its ifup script routes it)."""
    sh("ip", "netns", "add", HOST)
    sh("ip", "netns", "add", B)
    for key in ("net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0"):
        sh(*in_ns(HOST, "sysctl", "-qw", key))
    _, b_if, b_mac, b_addr = VMS["b"]
    veth(B, b_if, b_mac, b_addr)
    a_ns, a_if, a_mac, a_addr = VMS["a"]
    if a_kind == "veth":
        sh("ip", "netns", "add", A)
        veth(A, a_if, a_mac, a_addr)
    elif a_kind == "tap":
        for cmd in (f"tuntap add dev {a_if} mode tap", f"link set {a_if} up",
                    f"addr add {GW4}/32 dev {a_if}", f"route add {a_addr}/32 dev {a_if}",
                    # the feeder never answers ARP: the host knows the VM's MAC (as it would learn it)
                    f"neigh replace {a_addr} lladdr {a_mac} dev {a_if} nud permanent"):
            sh("ip", "-n", HOST, *cmd.split())
    # namespace b has no listener for the allowed UDP frames: one ICMP error per 1000 s at most,
    # not one per frame sent back into the measurement.
    sh(*in_ns(B, "sysctl", "-qw", "net.ipv4.icmp_ratelimit=1000000"))


def veth(ns: str, host_if: str, mac: str, addr: str) -> None:
    for cmd in (f"link add {host_if} type veth peer name eth0 address {mac} netns {ns}",
                f"link set {host_if} up", f"addr add {GW4}/32 dev {host_if}",
                f"route add {addr}/32 dev {host_if}"):
        sh("ip", "-n", HOST, *cmd.split())
    for cmd in ("link set lo up", "link set eth0 up", f"addr add {addr}/32 dev eth0",
                f"route add {GW4}/32 dev eth0", f"route add default via {GW4} dev eth0"):
        sh("ip", "-n", ns, *cmd.split())


def teardown() -> None:
    for ns in (HOST, A, B):
        sh("ip", "netns", "del", ns, check=False)
    sh("rm", "-rf", f"/sys/fs/bpf/{TAG}", check=False)


class Hooks:
    """skyguard's Datapath in the host namespace, attached at one from_vm hook at a time."""

    def __init__(self):
        self.worker = progrun.NetnsThread(f"/run/netns/{HOST}")
        self.dp = None

    def attach(self, hook: str) -> None:
        from skyguard.datapath.datapath import Datapath
        self.dp = self.worker.call(Datapath, Path(f"/sys/fs/bpf/{TAG}/{hook}"), hook)
        self.worker.call(self.dp.apply_policy, policy())
        for _ns, host_if, _mac, _addr in VMS.values():
            self.worker.call(self.dp.attach, host_if)

    def drops(self) -> int:
        return sum(d["packets"] for d in self.worker.call(self.dp.counters)["drops"])

    def detach(self) -> None:
        if self.dp is not None:
            self.worker.call(self.dp.detach_all)
            self.dp.close()
            self.dp = None

    def close(self) -> None:
        self.detach()
        self.worker.close()


# ---- kind "tap": frames written into a tap, no guest ------------------------------------------

def frame(dst_mac: str, src_mac: str, src: str, dst: str, dport: int) -> bytes:
    """A 60-byte Ethernet/IPv4/UDP frame (64 on the wire with the FCS), UDP checksum 0."""
    payload = b"\0" * 18
    udp = (10000).to_bytes(2, "big") + dport.to_bytes(2, "big") + (8 + len(payload)).to_bytes(2, "big") + b"\0\0"
    ip = bytearray(b"\x45\x00" + (20 + len(udp) + len(payload)).to_bytes(2, "big") + b"\0\0\x40\x00\x40\x11\0\0"
                   + ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed)
    s = sum(int.from_bytes(ip[i:i + 2], "big") for i in range(0, 20, 2))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    ip[10:12] = (~s & 0xFFFF).to_bytes(2, "big")
    macs = bytes.fromhex(dst_mac.replace(":", "") + src_mac.replace(":", ""))
    return macs + b"\x08\x00" + bytes(ip) + udp + payload


def build_feeder(work: Path) -> Path:
    if shutil.which("gcc") is None:
        sys.exit("from-vm-hook --kinds tap needs gcc (scripts/setup installs it)")
    src, exe = work / "tapfeed.c", work / "tapfeed"
    src.write_text(TAPFEED_C)
    sh("gcc", "-O2", "-o", str(exe), str(src))
    return exe


def feed(exe: Path, hexframe: str, newflows: bool) -> tuple[float, float, int]:
    """(frames per wall-clock second, frames per CPU second of the writer, frames)."""
    out = sh(*in_ns(HOST, str(exe), VMS["a"][1], hexframe, str(SECONDS), "1" if newflows else "0")).stdout.split()
    sent, errors, seconds, cpu = int(out[0]), int(out[1]), float(out[2]), float(out[3])
    frames = sent + errors  # a refused write was processed too (dropped by the kernel)
    return frames / seconds, frames / max(cpu, 1e-6), frames


def measure_tap(results: dict) -> None:
    work = Path(tempfile.mkdtemp(prefix="sg-hk-"))
    build("tap")
    hooks = Hooks()
    try:
        exe = build_feeder(work)
        tap_mac = json.loads(sh("ip", "-n", HOST, "-j", "link", "show", VMS["a"][1]).stdout)[0]["address"]
        _, _, a_mac, a_addr = VMS["a"]
        b_addr = VMS["b"][3]
        traffic = {"allowed": (frame(tap_mac, a_mac, a_addr, b_addr, ALLOWED_PORT).hex(), False),
                   "denied": (frame(tap_mac, a_mac, a_addr, b_addr, DENIED_PORT).hex(), False),
                   "new-flows": (frame(tap_mac, a_mac, a_addr, b_addr, ALLOWED_PORT).hex(), True)}
        samples: dict[str, list[float]] = {}
        wall: dict[str, list[float]] = {}
        for rnd in range(ROUNDS):
            for hook in ("none", *HOOKS):
                if hook != "none":
                    hooks.attach(hook)
                for name, (hexframe, newflows) in traffic.items():
                    if hook == "none" and name == "new-flows":
                        continue  # without a filter, a new flow costs what any frame costs
                    before = hooks.drops() if hook != "none" else 0
                    pps, per_cpu, frames = feed(exe, hexframe, newflows)
                    # the share of frames the datapath dropped (new flows: past the VM's flow share)
                    dropped = (hooks.drops() - before) / frames if hook != "none" else 0.0
                    results.setdefault("tap_dropped_share", {}).setdefault(f"{hook} {name}", []).append(round(dropped, 3))
                    samples.setdefault(f"{hook} {name}", []).append(per_cpu)
                    wall.setdefault(f"{hook} {name}", []).append(pps)
                    log(f"tap round {rnd + 1}/{ROUNDS} {hook:10} {name:9} {per_cpu / 1e3:7.0f} kframes per CPU-s"
                        f" ({1e6 / per_cpu:5.2f} us/frame; {pps / 1e3:5.0f} kframes/s wall; {dropped:4.0%} dropped)")
                hooks.detach()
        # frames per CPU-second of the host (median), and the same as wall-clock frames/s
        results["tap"] = {k: round(statistics.median(v)) for k, v in samples.items()}
        results["tap_wall"] = {k: round(statistics.median(v)) for k, v in wall.items()}
        results["tap_samples"] = {k: [round(x) for x in v] for k, v in samples.items()}
    finally:
        hooks.close()
        teardown()
        shutil.rmtree(work, ignore_errors=True)


# ---- kind "guest": one real guest on a tap, iperf3 to namespace b ----------------------------

def measure_guest(results: dict) -> None:
    from skyguard.lab import qemu
    image = qemu.find_image()
    accel, why = qemu.choose_accel(image)
    log(f"guest: {why}")
    work = Path(tempfile.mkdtemp(prefix="sg-hk-", dir="/run"))
    _, a_if, a_mac, a_addr = VMS["a"]
    spec = qemu.GuestSpec("a", a_if, a_mac, [a_addr], work / "a")
    build("guest")
    hooks = Hooks()
    pid = None
    try:
        pid = qemu.start(spec, image, accel, Path(f"/run/netns/{HOST}"))
        log(f"guest booted in {qemu.wait_booted(spec, pid):.1f} s")
        agent = qemu.Agent(spec.agent_socket)
        samples: dict[str, list[float]] = {}
        for rnd in range(ROUNDS):
            for hook in ("none", *HOOKS):
                if hook != "none":
                    hooks.attach(hook)
                for flood in (False, True):
                    if hook == "none" and flood:
                        continue
                    gbit = guest_iperf(agent, flood)
                    key = f"{hook}{' +flood' if flood else ''}"
                    samples.setdefault(key, []).append(gbit)
                    log(f"guest round {rnd + 1}/{ROUNDS} {key:18} {gbit * 1000:6.0f} Mbit/s")
                hooks.detach()
        results["guest"] = {k: round(statistics.median(v), 3) for k, v in samples.items()}
        results["guest_samples"] = samples
        results["guest_accel"] = accel
    finally:
        hooks.close()
        if pid is not None:
            from skyguard.lab import procs
            procs.stop([pid])
        teardown()
        shutil.rmtree(work, ignore_errors=True)


def guest_iperf(agent, flood: bool) -> float:
    b_addr = VMS["b"][3]
    server = subprocess.Popen(in_ns(B, "iperf3", "-s", "-1", "-p", str(ALLOWED_PORT)),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    try:
        if flood:  # a denied UDP flood from the same guest (busybox shell + netcat), for the
            # measurement only: `timeout` ends the shell, and nc exits when its input closes
            agent.run(f"(timeout {SECONDS + 2} sh -c 'while :; do head -c 18 /dev/zero; done' "
                      f"| nc -u {b_addr} {DENIED_PORT}) >/dev/null 2>&1 &", timeout=30)
        out = agent.run(f"iperf3 -c {b_addr} -p {ALLOWED_PORT} -t {SECONDS} -J", timeout=SECONDS + 60)
        if out.returncode != 0:
            raise RuntimeError(f"iperf3 in the guest failed: {out.stderr.decode(errors='replace')[-300:]}")
        return json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"] / 1e9
    finally:
        if flood:
            time.sleep(3)  # the flood's own timeout
        server.kill()
        server.wait()


# ---- kind "veth": the earlier measurement ----------------------------------------------------

def measure_veth(results: dict) -> None:
    build("veth")
    hooks = Hooks()
    try:
        samples: dict[str, list[float]] = {}
        for _ in range(ROUNDS):
            for hook in ("none", *HOOKS):
                if hook != "none":
                    hooks.attach(hook)
                samples.setdefault(hook, []).append(veth_iperf())
                log(f"veth {hook:10} {samples[hook][-1]:.2f} Gbit/s")
                hooks.detach()
        results["veth"] = {k: round(statistics.median(v), 2) for k, v in samples.items()}
    finally:
        hooks.close()
        teardown()


def veth_iperf() -> float:
    server = subprocess.Popen(in_ns(B, "iperf3", "-s", "-1", "-p", str(ALLOWED_PORT)),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    try:
        out = sh(*in_ns(A, "iperf3", "-c", VMS["b"][3], "-p", str(ALLOWED_PORT), "-t", str(SECONDS), "-J")).stdout
        return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9
    finally:
        server.kill()
        server.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default="tap,guest", help="comma-separated: tap, guest, veth")
    kinds = parser.parse_args().kinds.split(",")
    if os.geteuid() != 0:
        sys.exit("from-vm-hook needs root")
    bad = set(kinds) - {"tap", "guest", "veth"}
    if bad:
        sys.exit(f"unknown kind(s): {', '.join(sorted(bad))} (tap, guest, veth)")
    results: dict = {"seconds_per_sample": SECONDS, "rounds": ROUNDS}
    for kind in kinds:
        {"tap": measure_tap, "guest": measure_guest, "veth": measure_veth}[kind](results)
    out = {"name": "from-vm-hook", "metric": "per from_vm hook: frames per host CPU-second into a tap (tap), "
           "TCP Gbit/s guest->namespace (guest), TCP Gbit/s namespace->namespace (veth); medians",
           "detail": results}
    if "tap" in results:  # the headline: a denied flood into a tap, TC (the default) and the best hook
        tap = results["tap"]
        best = max(HOOKS, key=lambda h: tap[f"{h} denied"])
        out.update(skyguard=tap["tc denied"], anchor=tap["none denied"],
                   ratio=round(tap["tc denied"] / tap["none denied"], 3), best_hook_on_tap_denied=best,
                   best_hook_on_tap_allowed=max(HOOKS, key=lambda h: tap[f"{h} allowed"]))
    res = Path(os.environ.get("SKYGUARD_BENCH_RESULTS", ROOT / "bench" / "results"))
    res.mkdir(parents=True, exist_ok=True)
    (res / "from-vm-hook.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
