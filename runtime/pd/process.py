"""Command line of the PD worker processes: the decode process and one process per prefill rank.

    python -m kvproof.runtime.pd.process decode  --stdin     (launcher: pd.launch.spawn_worker)
    python -m kvproof.runtime.pd.process prefill --stdin

The arguments (--client HOST:PORT --config JSON for decode; --rank W --control HOST:PORT
--data HOST:PORT --config JSON for a prefill rank) and the deployment secret arrive on stdin,
never on the command line (started by hand: the secret from $KVPROOF_SECRET_FILE or
$KVPROOF_SECRET).

The loops are decode_process.py and prefill_process.py; what they share is plumbing.py.
Decode listens on one control channel and one data connection per prefill rank (so a
connection's rank is known without a handshake race) and reports `Ready` (the addresses)
and `Up` (every rank connected) to its client.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from kvproof.runtime.pd.config import PDConfig
from kvproof.runtime.pd.launch import read_stdin_doc, secret_from_env
from kvproof.runtime.pd.decode_process import run_decode
from kvproof.runtime.pd.prefill_process import run_prefill


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"address {text!r}, expected HOST:PORT")
    return host, int(port)


def worker_args(prog: str, argv: list[str] | None = None,
                extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """Parse and check a worker process's command line (decode, or one prefill rank)."""
    ap = argparse.ArgumentParser(prog=prog)
    ap.add_argument("role", choices=("decode", "prefill"))
    ap.add_argument("--stdin", action="store_true",
                    help="read the other arguments and the deployment secret from stdin (how launchers start workers)")
    ap.add_argument("--config", help="PDConfig as JSON")
    ap.add_argument("--listen-host", default="127.0.0.1", help="decode: address its rank listeners bind")
    ap.add_argument("--client", type=_addr, help="decode: the client's channel listener")
    ap.add_argument("--rank", type=int, help="prefill: this rank (writer index)")
    ap.add_argument("--control", type=_addr, help="prefill: decode's control listener for this rank")
    ap.add_argument("--data", type=_addr, help="prefill: decode's data listener for this rank")
    if extra is not None:
        extra(ap)
    argv = sys.argv[1:] if argv is None else argv
    if "--stdin" in argv:                   # the real arguments are on stdin
        rest, secret = read_stdin_doc()
        a = ap.parse_args([x for x in argv if x != "--stdin"] + rest)
    else:                                   # started by hand: the secret from a 0600 file or the environment
        a = ap.parse_args(argv)
        try:
            secret = secret_from_env()
        except ValueError as e:
            ap.error(str(e))
    a.secret = secret
    if a.config is None:
        ap.error("--config is required")
    if a.role == "decode" and a.client is None:
        ap.error("decode needs --client")
    if a.role == "prefill" and (a.rank is None or a.control is None or a.data is None):
        ap.error("prefill needs --rank, --control and --data")
    return a


def main(argv: list[str] | None = None) -> int:
    """Command-line entry of a worker process."""
    a = worker_args("python -m kvproof.runtime.pd.process", argv)
    cfg = PDConfig.from_json(a.config)
    if a.role == "decode":
        return run_decode(cfg, a.client, secret=a.secret, listen_host=a.listen_host)
    return run_prefill(cfg, a.rank, a.control, a.data, secret=a.secret)


if __name__ == "__main__":
    sys.exit(main())
