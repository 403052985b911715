"""Starting PD worker processes without putting anything private on their command lines.

A spawned worker's command line is `python -m MODULE ROLE --stdin`: everything else (config,
peer addresses, the engine config) and the deployment secret arrive as one JSON document on its
standard input, an inherited pipe that no other user can read (a command line is public through
`ps` and /proc/PID/cmdline). A worker started by hand (`kvproof serve --role ...`) takes the
secret from $KVPROOF_SECRET_FILE (a 0600 file) or $KVPROOF_SECRET instead.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import IO, Any

from kvproof.runtime.transport.auth import SECRET_ENV, SECRET_FILE_ENV, Secret


def spawn_worker(module: str, role: str, argv: list[str], secret: Secret, **popen: Any) -> subprocess.Popen:
    """Start `python -m module role --stdin` and hand it `argv` and the secret through a pipe."""
    p = subprocess.Popen([sys.executable, "-m", module, role, "--stdin"], stdin=subprocess.PIPE, **popen)
    assert p.stdin is not None
    try:
        p.stdin.write(json.dumps({"argv": argv, "secret": secret.hex()}).encode())
        p.stdin.close()
    except OSError:     # the worker died at once; its exit code tells the launcher
        pass
    return p


def read_stdin_doc(stream: IO[str] | None = None) -> tuple[list[str], Secret]:
    """The (argv, secret) a launcher wrote to this worker's stdin; ValueError names what is wrong."""
    text = (stream or sys.stdin).read()
    try:
        doc = json.loads(text)
        argv, secret = doc["argv"], doc["secret"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"worker document on stdin is malformed ({e!r}); expected "
                         f'{{"argv": [...], "secret": "<hex>"}} from the launcher') from None
    if not isinstance(argv, list) or not all(isinstance(x, str) for x in argv):
        raise ValueError(f"worker document: argv={argv!r}, expected a list of strings")
    return argv, Secret.from_hex(secret)


def secret_from_env() -> Secret:
    """The deployment secret of a hand-started role; ValueError says how to provide one."""
    s = Secret.from_env()
    if s is None:
        raise ValueError(f"no deployment secret: set {SECRET_FILE_ENV} to a 0600 file holding it (hex; "
                         f"`kvproof secret FILE` makes one) or {SECRET_ENV} to it; the same secret on every role")
    return s
