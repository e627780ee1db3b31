"""
CPU microseconds per relayed event through the real stack, in one process,
no syscalls: GatewaySite / GatewayChannel / GatewayRequest on the client
side (a tcp.Server transport, so the write-through runs, whose socket
"sends" with the C builtin len), GatewayResource, Relay and Coalescer, and
the real upstream client (UpstreamClient: the endpoint's wrapper, the
capped HTTP/1.1 protocol, the chunked decoder, treq's Response) fed chunked
event-stream reads over a StringTransport. S streams get N reads each, one
per stream per reactor turn; EPR events per read (1: light load; more: a
loaded gateway whose reads batch). Run from a tree's root, against any tree:

    EPR=1 .venv/bin/python bench/relay_event.py TREE [S=200] [N=200] [ROUNDS=5] [prof]

Prints min / median / all rounds; with a fifth argument, a cProfile of one
round instead.
"""
import gc, json, os, socket, sys, time
tree = os.path.abspath(sys.argv[1])
sys.path.insert(0, tree)
S = int(sys.argv[2]) if len(sys.argv) > 2 else 200
N = int(sys.argv[3]) if len(sys.argv) > 3 else 200
R = int(sys.argv[4]) if len(sys.argv) > 4 else 5
EPR = int(os.environ.get("EPR", "1"))
from twisted.internet import tcp
from twisted.internet.testing import MemoryReactorClock, StringTransport
import llmgate
assert llmgate.__file__.startswith(tree), llmgate.__file__
from tests.fakes import make_config, RecordingAccounting
from llmgate.relay.client import UpstreamClient
from llmgate.api.resource import GatewayResource
from llmgate.edge.site import GatewaySite

class FakeSock:
    send = staticmethod(len)
    def fileno(self): return -1
    def close(self): pass
    def shutdown(self, how): pass
    def getsockname(self): return ('127.0.0.1', 18301)
    def getpeername(self): return ('127.0.0.1', 40000)
    def setsockopt(self, *a): pass

def setup():
    clock = MemoryReactorClock()
    cfg = make_config(providers={"oai": {"kind": "openai", "base_url": "http://127.0.0.1:18300/v1", "api_key_env": "OAI_KEY", "default": True}}, models={})
    up = UpstreamClient(clock)
    acc = RecordingAccounting(clock)
    res = GatewayResource(cfg, up.http, clock, acc, coalesce=True)
    site = GatewaySite(res, clock, cfg.max_body_bytes)
    site.doStart()
    body = json.dumps({"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode()
    ups = []
    chans = []
    keep = []
    for i in range(S):
        a, b = socket.socketpair()
        keep.append((a, b))
        ch = site.buildProtocol(None)
        t = tcp.Server(a, ch, ("127.0.0.1", 40000 + i), None, i, clock)
        t.socket = FakeSock()
        ch.makeConnection(t)
        assert type(t).__name__ in ("_WriteThrough", "SendNowServer"), type(t)  # older trees: the edge's own class
        chans.append(ch)
        ch.dataReceived(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        host, port, factory, timeout, bind = clock.tcpClients[-1]
        p = factory.buildProtocol(None)
        ut = StringTransport()
        ut.protocol = p
        p.makeConnection(ut)
        ups.append(ut)
    clock.advance(0)
    head = b'data: {"id":"chatcmpl-mock","object":"chat.completion.chunk","created":1700000000,"model":"gpt-4o","choices":'
    for ut in ups:
        ut.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n")
        e = head + b'[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n'
        ut.protocol.dataReceived(b"%x\r\n%s\r\n" % (len(e), e))
    clock.advance(0)
    words = [b"Hello", b" world", b" this", b" is", b" a", b" test"]
    events = [head + b'[{"index":0,"delta":{"content":"' + w + b'"},"finish_reason":null}]}\n\n' for w in words]
    frames = [b"%x\r\n%s\r\n" % (len(e), e) for e in events]
    if EPR > 1:
        frames = [b"".join(frames[(i + k) % len(frames)] for k in range(EPR)) for i in range(len(frames))]
    return clock, ups, frames, keep, acc, res, chans

def run():
    clock, ups, frames, keep, acc, res, chans = setup()
    protos = [ut.protocol for ut in ups]
    gc.collect()
    t0 = time.perf_counter(); c0 = time.process_time()
    for i in range(N):
        f = frames[i % len(frames)]
        for p in protos:
            p.dataReceived(f)
        clock.advance(0)
    c1 = time.process_time(); t1 = time.perf_counter()
    # Sanity: every stream relayed every event, nothing left queued.
    for ch in chans:
        assert not ch.transport.dataBuffer and not ch.transport._tempDataBuffer, "queued"
    assert len(res.active) == S, len(res.active)
    outs = {r.exchange.bytes_out for r in res.active}
    assert len(outs) == 1 and min(outs) > N * 150, outs
    for a, b in keep:
        a.close(); b.close()
    return (c1 - c0) / (S * N * EPR) * 1e6

if __name__ == "__main__" and len(sys.argv) > 5:
    import cProfile, pstats
    clock, ups, frames, keep, acc, res, chans = setup()
    protos = [ut.protocol for ut in ups]
    def loop():
        for i in range(N):
            f = frames[i % len(frames)]
            for p in protos:
                p.dataReceived(f)
            clock.advance(0)
    prof = cProfile.Profile()
    prof.runcall(loop)
    pstats.Stats(prof).sort_stats("tottime").print_stats(30)
    sys.exit()
if __name__ == "__main__":
    xs = [run() for _ in range(R)]
    xs.sort()
    print(f"{tree}: us/event min {xs[0]:.3f} median {xs[len(xs)//2]:.3f} all {' '.join(f'{x:.3f}' for x in xs)}")
