"""Pass stdin to stdout unchanged, except torchrun's failure report after a clean one-line error.

    tune run ... 2>&1 | python launch/quiet_torchrun.py      (launch/run_node.sh; KD_DEBUG=1 skips the filter)

Once a ``kd: error`` or ``kd preflight: FAIL`` line has passed, a following ``Traceback (most recent call last):``
block, through the end of torchrun's ``ChildFailedError`` box (its second ``=====`` line), is replaced by one note.
Bytes are passed through as they come (standard library only): progress bars that redraw a line with ``\\r`` keep
working, which a line-based filter (awk, sed) would hold back until the next newline.
"""

from __future__ import annotations

import os
import re
import sys

TRIGGER = re.compile(rb"kd: error|kd preflight: FAIL")
RULE = re.compile(rb"^=+\s*$")
NOTE = b"[kd launch] (torchrun's failure report for the error above left out; KD_DEBUG=1 shows it)\n"


def main() -> int:
    err = skip = False
    rules = 0
    cur = b""
    emitted = 0  # bytes of ``cur`` (the unfinished line) already written

    def write(b: bytes) -> None:
        if b:
            os.write(1, b)

    while True:
        try:
            chunk = os.read(0, 65536)
        except InterruptedError:
            continue
        if not chunk:
            break
        cur += chunk
        while b"\n" in cur:
            line, cur = cur.split(b"\n", 1)
            done, emitted = emitted, 0
            if skip:
                if RULE.match(line):
                    rules += 1
                    if rules == 2:
                        skip = False
                        write(NOTE)
                continue
            if err and line.startswith(b"Traceback (most recent call last):") and not done:
                skip, rules = True, 0
                continue
            if TRIGGER.search(line):
                err = True
            write(line[done:] + b"\n")
        if cur and not skip:
            write(cur[emitted:])
            emitted = len(cur)
    if cur and not skip:
        write(cur[emitted:])
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
