"""Bytes a chat RequestCounter holds after K of a stream's events (tracemalloc), averaged over K. Run from the repository root: .venv/bin/python bench/counter_memory.py"""
import sys, tracemalloc; sys.path.insert(0, __import__('os').path.dirname(__file__))
import framing
from llmgate.accounting.recorder import RequestCounter
ev = framing.stream(50)[:-1]  # without the end
tot = 0
for k in range(1, len(ev) + 1):
    tracemalloc.start()
    c = RequestCounter("openai.chat", False)
    for d in ev[:k]:
        d = bytes(bytearray(d))  # the relay's own copy of the read
        r = getattr(c, "relay", None)
        if r: r(d)
        else: c.feed(d); c.strip(d)
        del d
    cur = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    tot += cur
print("mean %.0f bytes per counter over a 50-token stream's life; at the end %d" % (tot / len(ev), cur))
