"""Interpreted Instance vs FastInstance: microseconds per monitor firing/enabled."""
import time
from fractions import Fraction
from kvproof.spec.instance import Instance
from kvproof.spec.compiled import FastInstance
from kvproof.spec.specdec_monitor import monitor_protocol
proto = monitor_protocol(128, Fraction(7,5), Fraction(24,25))
for cls in (Instance, FastInstance):
    inst = cls(proto, "fixed", {}, actor="monitor")
    inst.fire("step", accepted=1, drafted=2)
    n = 3000
    t = time.perf_counter()
    for i in range(n):
        inst.fire("step", accepted=i % 3, drafted=2)
        inst.enabled("flag_low_accept"); inst.enabled("flag_degenerate")
    dt = (time.perf_counter() - t) / n / 3 * 1e6
    print(cls.__name__, f"{dt:.2f} us per call (fire/enabled avg)", inst.state)
