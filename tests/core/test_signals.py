"""A signal that arrives while the loop spins or is about to sleep still
wakes it: Python runs its handler at once, not at the next event."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import os, signal, socket, threading
    import evpl

    loop = evpl.Loop(spin_ns=5_000_000)     # a long spin: the signal lands in it
    received = threading.Event()

    class Sink(evpl.Handler):
        def on_datagram(self, bind, buf, addr):
            received.set()

    bind = loop.bind("udp", ("127.0.0.1", 0), Sink())
    signal.signal(signal.SIGUSR1, lambda *a: loop.stop())
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    go = threading.Event()

    def poke():
        for _ in range(ROUNDS):
            go.wait()
            go.clear()
            # activity makes the loop spin (without the GIL, running no
            # Python code): the signal lands in that spin
            peer.sendto(b"x", bind.local_address)
            received.wait()
            received.clear()
            os.kill(os.getpid(), signal.SIGUSR1)

    t = threading.Thread(target=poke, daemon=True)
    t.start()
    for i in range(ROUNDS):
        go.set()
        loop.run()                  # returns only through the handler's stop()
    print("rounds", ROUNDS)
""")


def test_signal_wakes_an_idle_loop():
    rounds = 200
    proc = subprocess.run([sys.executable, "-c", SCRIPT.replace("ROUNDS", str(rounds))],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["rounds", str(rounds)]
