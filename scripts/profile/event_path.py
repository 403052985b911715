"""CPU cost of one decode step's token events, decode side + router side: JSON Events vs the EVENTS frame.

    python scripts/profile/event_path.py [events_per_step] [tokens_per_event]   (see docs/performance.md)
"""
import sys
import time
from dataclasses import fields

from kvproof.runtime.pd.messages import Events, decode_message, encode, events_of
from kvproof.runtime.serving.engine_api import TokenEvent
from kvproof.runtime.transport.control import Kind, decode_message as frame_json, encode_frame
from kvproof.runtime.transport.event_frames import decode_events, encode_events

N = int(sys.argv[1]) if len(sys.argv) > 1 else 32
T = int(sys.argv[2]) if len(sys.argv) > 2 else 2
FIELDS = tuple(f.name for f in fields(TokenEvent))
step = [(rid, TokenEvent(str(rid), tuple(range(65, 65 + T)), completion_tokens=0)) for rid in range(1, N + 1)]


def json_path() -> list:
    items = []
    for rid, ev in step:                                   # decode: DecodeModel._event's old shallow copy
        d = {f: getattr(ev, f) for f in FIELDS}
        d["tokens"] = list(ev.tokens)
        items.append([rid, d])
    frame = encode_frame(Kind.MSG, encode(Events(items)))
    msg = decode_message(frame_json(frame[12:]))           # router: parse, validate, unpack
    out = []
    for e in events_of(msg):
        d = dict(e.event)
        d["tokens"] = tuple(d["tokens"])
        d["request_id"] = str(e.rid)
        out.append(TokenEvent(**d))
    return out


def binary_path() -> list:
    payload = encode_events(step)                          # decode: one packed buffer
    return [TokenEvent(str(w.rid), *w[1:]) for w in decode_events(payload)]   # router: check + unpack


assert json_path() == binary_path() == [ev for _, ev in step]
for name, fn in (("json Events", json_path), ("binary EVENTS", binary_path)):
    reps = 300
    t0 = time.process_time()
    for _ in range(reps):
        fn()
    dt = (time.process_time() - t0) / reps
    print(f"{name:14s} {dt * 1e3:7.3f} ms per step of {N} events ({dt * 1e6 / N:6.1f} us per event)")
