"""Rendezvous pre-checks for launch/run_node.sh (standard library only, runs before torchrun).

    python launch/rdzv_check.py client NODE_RANK MASTER_ADDR MASTER_PORT TIMEOUT_S
    python launch/rdzv_check.py host MASTER_ADDR MASTER_PORT

``client`` (NODE_RANK > 0): TCP-connects to MASTER_ADDR:MASTER_PORT (node 0's rendezvous store), retrying until
TIMEOUT_S; exit 0 once it answers, else one line naming the address and port, exit 2. Without it, torchrun's static
rendezvous waits 600 s for a wrong MASTER_ADDR or a closed port and then prints a C++ stack and a traceback.
``host`` (NODE_RANK 0): MASTER_ADDR should be one of this host's addresses (a warning otherwise: the other nodes
connect to it) and MASTER_PORT must be free here (exit 2 otherwise: torchrun could not listen on it).
"""

from __future__ import annotations

import errno
import socket
import sys
import time


def client(node_rank: str, addr: str, port: int, timeout_s: float) -> int:
    where = f"{addr}:{port}"
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    try:
        socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        print(f"[kd launch] node {node_rank}: cannot resolve MASTER_ADDR={addr} ({e.strerror}); set MASTER_ADDR to "
              "node 0's address on the link between the nodes (e.g. its RoCE IP)", file=sys.stderr, flush=True)
        return 2
    said, last = False, ""
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((addr, port), timeout=max(0.5, min(3.0, left))):
                pass
            print(f"[kd launch] node {node_rank}: rendezvous {where} answers"
                  + (f" (after {time.monotonic() - t0:.0f} s)" if said else ""), flush=True)
            return 0
        except OSError as e:
            last = e.strerror or type(e).__name__
        if time.monotonic() >= deadline:
            break
        if not said:
            print(f"[kd launch] node {node_rank}: waiting up to {timeout_s:g} s for the rendezvous at {where} "
                  f"({last}; KD_RDZV_TIMEOUT)", flush=True)
            said = True
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    print(f"[kd launch] node {node_rank}: cannot reach the rendezvous at {where} within {timeout_s:g} s (last error: "
          f"{last}; is node 0 started? is the port open? check MASTER_ADDR)", file=sys.stderr, flush=True)
    return 2


def host(addr: str, port: int) -> int:
    try:
        infos = socket.getaddrinfo(addr, 0, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        print(f"[kd launch] node 0: cannot resolve MASTER_ADDR={addr} ({e.strerror}); set it to this node's address "
              "on the link between the nodes", file=sys.stderr, flush=True)
        return 2
    local = False
    for family, _, _, _, sa in infos:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((sa[0], 0))  # only a local address can be bound
            local = True
            break
        except OSError:
            continue
    if not local:
        print(f"[kd launch] node 0: WARNING: MASTER_ADDR={addr} is not an address of this host: the other nodes "
              "connect to it, so it must be node 0's address on the link between the nodes ('hostname -I' lists "
              "them)", file=sys.stderr, flush=True)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a TIME_WAIT left by a previous run is fine
            s.bind(("", port))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            print(f"[kd launch] node 0: MASTER_PORT={port} is already in use on this host (a previous run still "
                  f"running? ss -ltnp 'sport = :{port}'); stop it or pick another MASTER_PORT on every node",
                  file=sys.stderr, flush=True)
            return 2
        print(f"[kd launch] node 0: cannot listen on MASTER_PORT={port} ({e.strerror})", file=sys.stderr, flush=True)
        return 2
    return 0


def main(argv) -> int:
    try:
        if argv[:1] == ["client"] and len(argv) == 5:
            return client(argv[1], argv[2], int(argv[3]), float(argv[4]))
        if argv[:1] == ["host"] and len(argv) == 3:
            return host(argv[1], int(argv[2]))
    except ValueError as e:
        print(f"[kd launch] error: bad rendezvous setting ({e}): MASTER_PORT and KD_RDZV_TIMEOUT must be numbers",
              file=sys.stderr)
        return 2
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
