"""Per-token cost of the anomaly monitor: interpreted Instance vs FastInstance, and RequestMonitor.step (timeit)."""
import time
import timeit
from fractions import Fraction

from kvproof.runtime.serving.monitor import MonitorConfig, RequestMonitor
from kvproof.spec.compiled import FastInstance
from kvproof.spec.instance import Instance
from kvproof.spec.specdec_monitor import monitor_protocol

proto = monitor_protocol(128, Fraction(7, 5), Fraction(24, 25))
for cls in (Instance, FastInstance):
    inst = cls(proto, "fixed", {}, actor="monitor")
    inst.fire("step", accepted=1, drafted=2)
    n = 3000
    t = time.perf_counter()
    for i in range(n):        # the runtime's per-token calls: a step, then try each suspicion (refused here)
        inst.fire("step", accepted=i % 3, drafted=2)
        inst.try_fire("suspect_low_accept")
        inst.try_fire("suspect_degenerate")
    dt = (time.perf_counter() - t) / n / 3 * 1e6
    print(cls.__name__, f"{dt:.2f} us per call (fire/try_fire avg)", inst.state)


def healthy():            # mean accept length 2.0: armed after 128 tokens, never suspected
    mon, pat, i = RequestMonitor(MonitorConfig(), audit=lambda: 1e-9), [(1, 2), (2, 2), (0, 2), (1, 2)], [0]

    def f():
        mon.step(*pat[i[0] & 3])
        i[0] += 1
    return f


def looping():            # accept length 1.0: suspected every 129 tokens, the audit (1e-9) clears it
    mon = RequestMonitor(MonitorConfig(), audit=lambda: 1e-9)
    return lambda: mon.step(0, 2)


def suspect_every_step():  # min_tokens 0: every step suspects, audits and clears
    mon = RequestMonitor(MonitorConfig(min_tokens=0), audit=lambda: 1e-9)
    return lambda: mon.step(0, 2)


for name, mk in (("healthy", healthy), ("looping", looping), ("suspect+audit+clear every step", suspect_every_step)):
    best = min(timeit.repeat(mk(), number=20000, repeat=5)) / 20000 * 1e6
    print(f"RequestMonitor.step, {name}: {best:.2f} us (best of 5 x 20000)")
