"""The start-up attacker of issue #13: an impostor connects to decode's control and data ports
before the real prefill rank, with a wrong secret and with none. It gets no prompt byte, none of
its writes land, the server keeps serving reference outputs, and the rejections are counted."""
from __future__ import annotations

import asyncio
import socket
import threading
import time

import aiohttp
import pytest

from kvproof.runtime.pd import engine as pd_engine
from kvproof.runtime.serving.engine import EngineConfig, SamplingParams, generate_reference
from kvproof.runtime.pd.engine import PDEngine, PDEngineConfig, wait_idle
from kvproof.runtime.serving.server import start_server
from kvproof.runtime.model.tokenizer import ByteTokenizer
from kvproof.runtime.transport.auth import AuthError, Secret, client_handshake
from kvproof.runtime.transport.frames import FrameType, Header, encode_header
from serving_testing import metric

TOK = ByteTokenizer()
PROMPT = "SECRET-PROMPT: the launch codes are 0000; def helper(x): return x"
FORGED = b"\xee" * 256


class Impostor:
    """Connects to one port first and records every byte it is sent."""

    def __init__(self, addr: tuple[str, int], mode: str, kind: str) -> None:
        self.got = bytearray()
        self.error: str | None = None
        self.sock = socket.create_connection(tuple(addr), timeout=5)
        self.thread = threading.Thread(target=self._run, args=(mode, kind), daemon=True)
        self.thread.start()

    def _run(self, mode: str, kind: str) -> None:
        s = self.sock
        try:
            if mode == "wrong-secret":
                try:
                    client_handshake(s, Secret.generate(), f"{kind}/0", timeout=30)
                    self.error = "handshake with a wrong secret succeeded"
                except AuthError as e:
                    self.error = e.reason
            elif kind == "ctrl":      # no secret: the old protocol, a Hello(rank 0) control frame
                s.sendall(b'KVCH\x01\x01\x00\x00' + (23).to_bytes(4, "little") + b'{"type":"hello","rank":0}'[:23])
            else:                     # no secret: a forged KV write into the pool, then one out of bounds
                s.sendall(encode_header(Header(FrameType.WRITE, 1, 0, 0, len(FORGED), None, (0, 0, 0))) + FORGED)
                s.sendall(encode_header(Header(FrameType.WRITE, 2, 0, 1 << 40, 16, None, ())) + b"\xee" * 16)
            s.settimeout(20)
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    return
                self.got += chunk
        except OSError:
            return


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["no-secret", "wrong-secret"])
def test_startup_impostor_gets_nothing_and_lands_nothing(monkeypatch, mode: str) -> None:
    impostors: list[Impostor] = []

    class AttackedCluster(pd_engine.ModelCluster):
        def _spawn(self, args: list[str]):
            if args[0] == "prefill":            # decode listens now; the attacker is faster than the rank
                assert self.ready is not None
                impostors.extend([Impostor(tuple(self.ready.control[0]), mode, "ctrl"),
                                  Impostor(tuple(self.ready.data[0]), mode, "data")])
                time.sleep(0.3)
            return super()._spawn(args)

    monkeypatch.setattr(pd_engine, "ModelCluster", AttackedCluster)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    ref = generate_reference(EngineConfig(num_drafts=0), [TOK.encode(PROMPT)], params)[0]

    async def main() -> tuple[list[str], str, dict]:
        engine = PDEngine(EngineConfig(), PDEngineConfig(slots=4, writers=1, max_prompt_tokens=128))
        runner, url = await start_server(engine, "127.0.0.1", 0)
        try:
            texts = []
            async with aiohttp.ClientSession() as s:
                for _ in range(2):
                    r = await s.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 12,
                                                                    "temperature": 0, "ignore_eos": True})
                    assert r.status == 200, await r.text()
                    texts.append((await r.json())["choices"][0]["text"])
                assert (await s.get(f"{url}/health")).status == 200
                st = await asyncio.get_running_loop().run_in_executor(None, wait_idle, engine, 30.0)
                metrics = await (await s.get(f"{url}/metrics")).text()
            return texts, metrics, st
        finally:
            await runner.cleanup()
            await engine.stop()

    texts, metrics, st = asyncio.run(main())
    assert texts == [TOK.decode(ref)] * 2, "outputs must be the reference's: no injected KV was used"
    assert len(impostors) == 2
    for imp in impostors:
        imp.thread.join(25)
        # the only bytes an impostor ever sees are the listener's challenge (magic, version, nonce)
        assert len(imp.got) <= 37 and (not imp.got or imp.got.startswith(b"KVAU")), bytes(imp.got[:80])
        assert PROMPT.encode()[:16] not in imp.got
        if mode == "wrong-secret":
            assert imp.error == "eof", imp.error    # the listener hung up on its proof, saying nothing
    rejected = st["rejected_connections_total{reason}"]
    # wrong secret: both proofs fail; none: the Hello is too short for a proof (timeout), the forged
    # write's bytes are read as one and fail
    assert rejected == ({"bad_mac": 2} if mode == "wrong-secret" else {"timeout": 1, "bad_mac": 1}), rejected
    assert metric(metrics, "kvproof_rejected_connections_total", reason="bad_mac") == rejected["bad_mac"]
    assert st["kv_foreign_landings_total"] == 0 and st["slots{state}"]["FREE"] == 4
