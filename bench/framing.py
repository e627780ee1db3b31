"""
The relay's per-read framing and accounting in-process (no sockets, no
reactor), in CPU microseconds per event: the relay's framer plus the
request counter on a stream shaped like the Go mock upstream's (bench/upstream).

    .venv/bin/python bench/framing.py TOKENS EVENTS_PER_READ

Under load a read carries several events; at light load one.
"""
import sys, time
from llmgate.relay.stream import Relay
from llmgate.accounting.recorder import RequestCounter

HEAD = b'data: {"id":"chatcmpl-mock","object":"chat.completion.chunk","created":1764500000,"model":"gpt-4o-mini","choices":'
WORDS = [b"hello", b"world", b"the", b"quick", b"brown", b"fox"]

def stream(n):
    ev = [HEAD + b'[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n']
    for i in range(n):
        ev.append(HEAD + b'[{"index":0,"delta":{"content":"' + WORDS[i % 6] + b'"},"finish_reason":null}]}\n\n')
    ev.append(HEAD + b'[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n' + HEAD +
              b'[],"usage":{"prompt_tokens":9,"completion_tokens":%d,"total_tokens":%d}}\n\n' % (n, n + 9) + b"data: [DONE]\n\n")
    return ev

class F:
    _whole_events = Relay._whole_events
    def __init__(self):
        self._held = []; self._held_len = 0; self._max_event = 1 << 20
    def _cut(self, m): raise RuntimeError(m)

def run(reads, strip, streams):
    t0 = time.process_time()
    for _ in range(streams):
        f = F(); c = RequestCounter("openai.chat", strip)
        relay_read = getattr(c, "relay", None)
        for data in reads:
            data = f._whole_events(data)
            if not data:
                continue
            if relay_read is not None:
                data = relay_read(data)
            else:
                c.feed(data)
                data = c.strip(data)
        assert c.acc.usage is not None and c.acc.complete and c.terminal
    return time.process_time() - t0

if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    per = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    streams = 2000
    ev = stream(n)
    reads = [b"".join(ev[i:i + per]) for i in range(0, len(ev), per)]
    for strip in (False, True):
        best = min(run(reads, strip, streams) for _ in range(5))
        print(f"tokens={n} events/read={per} strip={strip}: {best / streams / len(ev) * 1e6:.2f} us/event, {best / streams * 1e6:.1f} us/stream")
