"""Copy stdin to stdout with each line prefixed by its arrival time (epoch seconds), ``\\r`` updates split as lines.

    python -u -m muffin.feedback.generate ... 2>&1 | python script/gpu/stamp.py > stage.log

The progress bars' ``\\r`` updates become lines of their own, so a stage's loop time is read between its bar's first
and last update (``script/gpu/summarize.py``), without the model load before it.
"""

from __future__ import annotations

import re
import sys
import time


def main() -> None:
    """A piece is stamped with the arrival of its first byte: tqdm writes ``\\r`` + text and ends the text only with
    the next update's ``\\r``, which may come much later."""
    out = sys.stdout
    pending, pending_t = b"", 0.0
    stream = sys.stdin.buffer
    while True:
        chunk = stream.read1(65536)
        now = time.time()
        if not chunk:
            break
        parts = re.split(rb"[\r\n]", pending + chunk)
        times = [pending_t if pending else now] + [now] * (len(parts) - 1)
        pending, pending_t = parts[-1], times[-1]
        for t, line in zip(times[:-1], parts[:-1]):
            if line.strip():
                out.write(f"{t:.3f}\t{line.decode(errors='replace')}\n")
        out.flush()
    if pending.strip():
        out.write(f"{pending_t:.3f}\t{pending.decode(errors='replace')}\n")


if __name__ == "__main__":
    main()
