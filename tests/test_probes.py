"""The kernel's tracking state stays exact: every tracked tgid is counted once in
the fast pre-filter, and both are empty again when the agent's tree has exited."""

from __future__ import annotations

import ctypes as ct
import os
import subprocess
import time
from pathlib import Path

from agentwarden.probes import net
from agentwarden.probes.loader import Probes, decode, remove_pins
from agentwarden.probes.process import ProbeLimits
from conftest import need_root


def test_tracking_and_filter_balance(fake_agent: Path) -> None:
    need_root()
    # a pin directory of its own: the default one is a production daemon's
    pin_dir = f"/sys/fs/bpf/aw-test-probes-{os.getpid()}"
    probes = Probes(ProbeLimits(pin_dir=pin_dir))
    try:
        probes.set_agent_comms([(fake_agent.name, 0)])
        records: list[bytes] = []
        agent = subprocess.Popen([str(fake_agent), "-c",
                                  "for i in 1 2 3; do (sleep 0.05 &); done; sh -c 'true | cat'; sleep 0.3"])
        while agent.poll() is None:
            probes.poll(records.append, 50)
        time.sleep(0.5)
        probes.poll(records.append, 0)
        decoded = [decode(r) for r in records]
        assert decoded, "no records from the agent"
        assert not list(probes.bpf[b"tracked"].items())
        assert all(v.value == 0 for v in probes.bpf[b"track_filter"].values())
        # a process seeded from userspace counts too, and is forgotten with its session
        probes.track(agent.pid, 42, 0)
        assert probes.is_tracked(agent.pid)
        assert probes.bpf[b"track_filter"][ct.c_int(agent.pid & 0xFFFF)].value == 1
        assert probes.untrack_session(42) == [agent.pid]
        assert probes.bpf[b"track_filter"][ct.c_int(agent.pid & 0xFFFF)].value == 0
        assert not any(isinstance(d, net.Data) for d in decoded)   # no sockets, no payload
        # process capture hangs on no syscall tracepoint (each one taxes every task on the host)
        attached = {name for gen in os.listdir(pin_dir) if gen.startswith("gen-")
                    for name in os.listdir(os.path.join(pin_dir, gen))}
        assert "tp-sched-sched_process_exec" in attached
        assert not [n for n in attached if n.startswith("tp-syscalls-")], sorted(attached)
        # the decision stop's guards: the signal tracepoint, and the dynamic loader's entry
        assert "tp-signal-signal_generate" in attached
        assert probes.loaders and [n for n in attached if n.startswith("uprobe-loader-")], sorted(attached)
    finally:
        probes.close()
        remove_pins(pin_dir)
