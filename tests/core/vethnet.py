"""Two network namespaces joined by a veth pair, for the ``xdp_udp`` tests.

``VethNet`` creates namespaces ``evx-xdp-<hex>-a`` and ``-b`` with one end of
a veth pair in each (10.<n>.0.1/24 on side "a", .2 on side "b"; IPv6
fd00:<n>::1/64 and ::2, added ``nodad`` and with duplicate address detection
off in both namespaces, so the link-local addresses are usable at once
too), and removes them (and so the pair) on close. :meth:`VethNet.inside` runs a block with
this thread in one side's namespace: sockets, AF_XDP sockets and netlink
sockets made there stay there after the block. :meth:`VethNet.run` and
:meth:`VethNet.popen` run commands there (ping, iperf3, a Python peer).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import subprocess
from collections.abc import Iterator
from typing import Any

import evpl

CLONE_NEWNET = 0x40000000


def veth_unavailable_reason() -> str | None:
    """Why the veth fixture cannot run here (None if it can)."""
    if os.geteuid() != 0:
        return f"network namespaces and AF_XDP need root (euid is {os.geteuid()})"
    if not os.path.exists("/proc/sys/net/ipv6"):
        return "this kernel has no IPv6 (the veth pair carries IPv4 and IPv6 addresses)"
    from evpl.core.xdp import unavailable_reason

    return unavailable_reason()


class VethNet:
    """Namespaces "a" and "b" joined by veth interfaces ``ifname["a"]`` and
    ``ifname["b"]``, addresses ``ip["a"]`` and ``ip["b"]``."""

    def __init__(self, *, rx_queues: int = 1) -> None:
        tag = secrets.token_hex(2)
        self.ns = {"a": f"evx-xdp-{tag}-a", "b": f"evx-xdp-{tag}-b"}
        self.ifname = {"a": f"evx-xdp-{tag}a", "b": f"evx-xdp-{tag}b"}
        subnet = 64 + int(tag, 16) % 128
        self.ip = {"a": f"10.{subnet}.0.1", "b": f"10.{subnet}.0.2"}
        self.ip6 = {"a": f"fd00:{subnet:x}::1", "b": f"fd00:{subnet:x}::2"}
        self.mtu = 1500
        self._libc = ctypes.CDLL(None, use_errno=True)
        try:
            for side in "ab":
                self._ip("netns", "add", self.ns[side])
                for conf in ("all", "default"):     # before the veth exists
                    self._sysctl(side, f"net.ipv6.conf.{conf}.accept_dad", "0")
            q = ["numrxqueues", str(rx_queues), "numtxqueues", str(rx_queues)]
            self._ip("link", "add", self.ifname["a"], *q, "netns", self.ns["a"], "type", "veth",
                     "peer", "name", self.ifname["b"], *q, "netns", self.ns["b"])
            for side in "ab":
                n = self.ns[side]
                self._ip("-n", n, "addr", "add", f"{self.ip[side]}/24", "dev", self.ifname[side])
                self._ip("-n", n, "-6", "addr", "add", f"{self.ip6[side]}/64", "dev",
                         self.ifname[side], "nodad")
                self._ip("-n", n, "link", "set", self.ifname[side], "up")
                self._ip("-n", n, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _ip(*args: str) -> None:
        r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")

    def _sysctl(self, side: str, key: str, value: str) -> None:
        path = "/proc/sys/" + key.replace(".", "/")
        with self.inside(side), open(path, "w") as f:
            f.write(value)

    def link_local(self, side: str) -> str:
        """Side ``side``'s link-local IPv6 address (fe80::...)."""
        import json

        out = self.run(side, ["ip", "-j", "-6", "addr", "show", "dev", self.ifname[side],
                              "scope", "link"])
        return next(a["local"] for a in json.loads(out.stdout)[0]["addr_info"] if "local" in a)

    def settle_ipv6(self) -> None:
        """Wait until IPv6 neighbour discovery works across the pair: a link
        just brought up loses its first neighbour solicitation (the kernel
        retries a second later), so a ping from "a" to "b" (which resolves
        both ways) goes first."""
        r = self.run("a", ["ping", "-6", "-c", "1", "-W", "10", self.ip6["b"]])
        if r.returncode != 0:
            raise RuntimeError(f"IPv6 across the veth pair: {r.stdout}{r.stderr}")

    def close(self) -> None:
        """Delete both namespaces (the veth pair goes with them)."""
        for n in self.ns.values():
            subprocess.run(["ip", "netns", "del", n], capture_output=True, timeout=30)

    def __enter__(self) -> VethNet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def inside(self, side: str) -> Iterator[None]:
        """This thread in side ``side``'s namespace for the block."""
        old = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        new = os.open(f"/run/netns/{self.ns[side]}", os.O_RDONLY)
        try:
            if self._libc.setns(new, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into {self.ns[side]}")
            try:
                yield
            finally:
                if self._libc.setns(old, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns back")
        finally:
            os.close(new)
            os.close(old)

    def cmd(self, side: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns[side], *argv]

    def run(self, side: str, argv: list[str], **kw: Any) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", 60)
        return subprocess.run(self.cmd(side, argv), **kw)

    def popen(self, side: str, argv: list[str], **kw: Any) -> subprocess.Popen:
        return subprocess.Popen(self.cmd(side, argv), **kw)

    def xdp_prog(self, side: str) -> str | None:
        """The name of the XDP program attached to side ``side``'s veth."""
        import json

        out = self.run(side, ["ip", "-j", "link", "show", "dev", self.ifname[side]])
        info = json.loads(out.stdout)[0]
        prog = info.get("xdp", {}).get("prog") or next(
            (p.get("prog") for p in info.get("xdp", {}).get("attached", []) if p.get("prog")),
            None)
        return prog.get("name") if prog else None


# ---- handlers the xdp_udp tests share ----
class Echo(evpl.Handler):
    """Echo every datagram to its sender, keeping (payload, address)."""

    def __init__(self) -> None:
        self.got: list[tuple[bytes, object]] = []

    def on_datagram(self, bind, buf, addr):
        self.got.append((bytes(buf), addr))
        bind.sendto(buf, addr)


class Recorder(evpl.Handler):
    """Keep every datagram as (payload, address)."""

    def __init__(self) -> None:
        self.got: list[tuple[bytes, object]] = []

    def on_datagram(self, bind, buf, addr):
        self.got.append((bytes(buf), addr))
