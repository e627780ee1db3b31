// Mock OpenAI-compatible upstream for the llmgate benchmark (stdlib only).
//
// POST /v1/chat/completions streams: a role chunk, N content chunks of one short
// word each, a finish chunk, a usage chunk if stream_options.include_usage, and
// "data: [DONE]", flushing after every event. N and the delay between content
// chunks come from the headers x-mock-tokens and x-mock-delay-ms (fallbacks:
// body max_tokens, then the -tokens/-delay-ms flags). A stream id comes from
// x-mock-id (fallback: body "user"); it keys the cancellation record.
//
// Faults (routing scenarios, bench/routing.py), drawn per request from one
// seeded generator (-seed), so a run is repeatable for a given arrival order:
// -slow-fraction F -slow-ttft S: that fraction of streams send their headers at
// once but wait S seconds before the first event; -fail-fraction F -fail-status
// N: that fraction are answered N at once with an OpenAI error body (N = 0:
// the connection is reset instead).
//
// GET /stats   -> {"started","completed","cancelled","active","slowed","failed","cancel_gap_ms_p50","cancel_gap_ms_p99"};
// with ?raw=1 also "cancel_gaps_ms", every gap, so that shards' figures merge exactly.
// GET /cancels -> {"<id>": <unix ns when the closed client connection was detected>, ...}
// POST /reset  -> clears counters and records.
//
// Shards: with -reuseport several upstream processes listen on the same -addr
// (SO_REUSEPORT: the kernel spreads the connections over them), so that no one
// process has to hold every socket of a big run (the hard RLIMIT_NOFILE is per
// process). Each counts only its own streams, so each also serves the same
// handlers on its own -admin address, where a runner asks every shard for
// /stats, /cancels and /reset and merges the answers. Without -reuseport the
// upstream is one process as before.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"io"
	"log"
	"math/rand"
	"net"
	"net/http"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

var words = []string{" the", " quick", " brown", " fox", " jumps", " over", " a", " lazy", " dog", " and"}

type stats struct {
	started, completed, cancelled, active, slowed, failed int64
	mu                                                    sync.Mutex
	gaps                                                  []float64 // ms from the last event write to detecting the close
	cancels                                               map[string]int64
}

var st = &stats{cancels: map[string]int64{}}

// faults: the seeded per-process fractions of slow and failing requests.
type faults struct {
	mu                         sync.Mutex
	rng                        *rand.Rand
	slowFraction, failFraction float64
	slowTTFT                   time.Duration
	failStatus                 int
}

var ft = &faults{rng: rand.New(rand.NewSource(1))}

// draw decides one request's fate: (fail, slow). One draw per request from
// the shared seeded generator; fail is decided first, then slow.
func (f *faults) draw() (bool, bool) {
	if f.failFraction <= 0 && f.slowFraction <= 0 {
		return false, false
	}
	f.mu.Lock()
	x := f.rng.Float64()
	f.mu.Unlock()
	if x < f.failFraction {
		return true, false
	}
	return false, x < f.failFraction+f.slowFraction
}

// fail answers the request with the configured status and an OpenAI error
// body, or (-fail-status 0) resets the connection without an answer.
func (f *faults) fail(w http.ResponseWriter) {
	atomic.AddInt64(&st.failed, 1)
	if f.failStatus == 0 {
		if conn, _, err := w.(http.Hijacker).Hijack(); err == nil {
			if tc, ok := conn.(*net.TCPConn); ok {
				tc.SetLinger(0) // RST, not FIN
			}
			conn.Close()
		}
		return
	}
	typ := "server_error"
	if f.failStatus == 429 {
		typ = "rate_limit_exceeded"
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(f.failStatus)
	io.WriteString(w, `{"error":{"message":"mock upstream: injected failure","type":"`+typ+`","param":null,"code":null}}`+"\n")
}

// waitSlow holds a slow stream's first event for slowTTFT after its headers
// were flushed; false when the client went away meanwhile.
func (f *faults) waitSlow(r *http.Request) bool {
	atomic.AddInt64(&st.slowed, 1)
	t := time.NewTimer(f.slowTTFT)
	defer t.Stop()
	select {
	case <-r.Context().Done():
		return false
	case <-t.C:
		return true
	}
}

type chatReq struct {
	Model         string `json:"model"`
	MaxTokens     int    `json:"max_tokens"`
	User          string `json:"user"`
	Stream        bool   `json:"stream"`
	StreamOptions *struct {
		IncludeUsage bool `json:"include_usage"`
	} `json:"stream_options"`
}

func headerInt(r *http.Request, name string, def int) int {
	if v, err := strconv.Atoi(r.Header.Get(name)); err == nil && v >= 0 {
		return v
	}
	return def
}

func chat(w http.ResponseWriter, r *http.Request, defTokens, defDelay int) {
	body, _ := io.ReadAll(r.Body)
	failNow, slow := ft.draw()
	if failNow {
		ft.fail(w)
		return
	}
	var req chatReq
	if err := json.Unmarshal(body, &req); err != nil {
		http.Error(w, `{"error":{"message":"bad json"}}`, 400)
		return
	}
	if req.Model == "" {
		req.Model = "mock"
	}
	if req.MaxTokens > 0 {
		defTokens = req.MaxTokens
	}
	n := headerInt(r, "x-mock-tokens", defTokens)
	delay := time.Duration(headerInt(r, "x-mock-delay-ms", defDelay)) * time.Millisecond
	id := r.Header.Get("x-mock-id")
	if id == "" {
		id = req.User
	}
	usage := `{"prompt_tokens":8,"completion_tokens":` + strconv.Itoa(n) + `,"total_tokens":` + strconv.Itoa(n+8) + `}`
	if !req.Stream {
		text := ""
		for i := 0; i < n; i++ {
			text += words[i%len(words)]
		}
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"id":"chatcmpl-mock","object":"chat.completion","created":0,"model":"`+req.Model+
			`","choices":[{"index":0,"message":{"role":"assistant","content":"`+text+`"},"finish_reason":"stop"}],"usage":`+usage+"}\n")
		return
	}
	atomic.AddInt64(&st.started, 1)
	atomic.AddInt64(&st.active, 1)
	defer atomic.AddInt64(&st.active, -1)
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	fl := w.(http.Flusher)
	head := `data: {"id":"chatcmpl-mock","object":"chat.completion.chunk","created":` +
		strconv.FormatInt(time.Now().Unix(), 10) + `,"model":"` + req.Model + `","choices":`
	last := time.Now()
	send := func(s string) bool {
		if _, err := io.WriteString(w, s); err != nil {
			return false
		}
		fl.Flush()
		last = time.Now()
		return true
	}
	cancelled := func() {
		now := time.Now()
		atomic.AddInt64(&st.cancelled, 1)
		st.mu.Lock()
		st.gaps = append(st.gaps, float64(now.Sub(last).Microseconds())/1000)
		if id != "" {
			st.cancels[id] = now.UnixNano()
		}
		st.mu.Unlock()
	}
	ctx := r.Context()
	if slow {
		fl.Flush() // headers now, content late: the case a hedge must catch
		if !ft.waitSlow(r) {
			cancelled()
			return
		}
	}
	if !send(head + `[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}` + "\n\n") {
		cancelled()
		return
	}
	timer := time.NewTimer(delay)
	defer timer.Stop()
	for i := 0; i < n; i++ {
		if delay > 0 {
			if i > 0 {
				timer.Reset(delay)
			}
			select {
			case <-ctx.Done():
				cancelled()
				return
			case <-timer.C:
			}
		}
		if !send(head + `[{"index":0,"delta":{"content":"` + words[i%len(words)] + `"},"finish_reason":null}]}` + "\n\n") {
			cancelled()
			return
		}
	}
	tail := head + `[{"index":0,"delta":{},"finish_reason":"stop"}]}` + "\n\n"
	if req.StreamOptions != nil && req.StreamOptions.IncludeUsage {
		tail += head + `[],"usage":` + usage + "}\n\n"
	}
	if !send(tail + "data: [DONE]\n\n") {
		cancelled()
		return
	}
	atomic.AddInt64(&st.completed, 1)
}

func pct(xs []float64, p float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	return s[int(p*float64(len(s)-1)+0.5)]
}

func main() {
	addr := flag.String("addr", "127.0.0.1:18000", "listen address")
	defTokens := flag.Int("tokens", 20, "default content chunks")
	defDelay := flag.Int("delay-ms", 10, "default delay between content chunks")
	flag.Float64Var(&ft.slowFraction, "slow-fraction", 0, "fraction of streams whose first event waits -slow-ttft")
	slowTTFT := flag.Float64("slow-ttft", 2, "seconds a slow stream waits before its first event")
	flag.Float64Var(&ft.failFraction, "fail-fraction", 0, "fraction of requests answered -fail-status at once")
	flag.IntVar(&ft.failStatus, "fail-status", 503, "status of the failed requests (0: reset the connection)")
	seed := flag.Int64("seed", 1, "seed of the fault draws")
	reusePort := flag.Bool("reuseport", false, "listen with SO_REUSEPORT, so several upstream processes share -addr")
	admin := flag.String("admin", "", "also serve /stats, /cancels, /reset (and chat) on this address, this process's own")
	flag.Parse()
	ft.slowTTFT = time.Duration(*slowTTFT * float64(time.Second))
	ft.rng = rand.New(rand.NewSource(*seed))
	if ft.slowFraction < 0 || ft.failFraction < 0 || ft.slowFraction+ft.failFraction > 1 || (ft.failStatus != 0 && (ft.failStatus < 400 || ft.failStatus > 599)) {
		log.Fatal("-slow-fraction and -fail-fraction must be >= 0 with a sum <= 1; -fail-status 400..599 or 0")
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/v1/chat/completions", func(w http.ResponseWriter, r *http.Request) {
		chat(w, r, *defTokens, *defDelay)
	})
	mux.HandleFunc("/stats", func(w http.ResponseWriter, r *http.Request) {
		st.mu.Lock()
		out := map[string]interface{}{
			"started": atomic.LoadInt64(&st.started), "completed": atomic.LoadInt64(&st.completed),
			"cancelled": atomic.LoadInt64(&st.cancelled), "active": atomic.LoadInt64(&st.active),
			"slowed": atomic.LoadInt64(&st.slowed), "failed": atomic.LoadInt64(&st.failed),
			"cancel_gap_ms_p50": pct(st.gaps, 0.5), "cancel_gap_ms_p99": pct(st.gaps, 0.99),
		}
		if r.URL.Query().Get("raw") == "1" {
			out["cancel_gaps_ms"] = append([]float64{}, st.gaps...)
		}
		st.mu.Unlock()
		json.NewEncoder(w).Encode(out)
	})
	mux.HandleFunc("/cancels", func(w http.ResponseWriter, r *http.Request) {
		st.mu.Lock()
		defer st.mu.Unlock()
		json.NewEncoder(w).Encode(st.cancels)
	})
	mux.HandleFunc("/reset", func(w http.ResponseWriter, r *http.Request) {
		st.mu.Lock()
		atomic.StoreInt64(&st.started, 0)
		atomic.StoreInt64(&st.completed, 0)
		atomic.StoreInt64(&st.cancelled, 0)
		atomic.StoreInt64(&st.slowed, 0)
		atomic.StoreInt64(&st.failed, 0)
		st.gaps, st.cancels = nil, map[string]int64{}
		st.mu.Unlock()
		io.WriteString(w, "{}\n")
	})
	ln, err := listen(*addr, *reusePort)
	if err != nil {
		log.Fatal(err)
	}
	if *admin != "" {
		aln, err := net.Listen("tcp", *admin)
		if err != nil {
			log.Fatal(err)
		}
		go func() { log.Fatal(http.Serve(aln, mux)) }()
	}
	log.Printf("mock upstream on %s (reuseport=%v, admin %q)", *addr, *reusePort, *admin)
	log.Fatal(http.Serve(ln, mux))
}

// soReusePort is SO_REUSEPORT on Linux (x86, arm, arm64, riscv; not mips or
// sparc): Go 1.19's syscall package does not name it, and golang.org/x/sys is
// not in the standard library.
const soReusePort = 0xf

// listen opens the shared port; with reusePort it sets SO_REUSEPORT before
// bind, which every process sharing the port must do.
func listen(addr string, reusePort bool) (net.Listener, error) {
	lc := net.ListenConfig{}
	if reusePort {
		lc.Control = func(network, address string, c syscall.RawConn) error {
			var serr error
			if err := c.Control(func(fd uintptr) {
				serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, soReusePort, 1)
			}); err != nil {
				return err
			}
			return serr
		}
	}
	return lc.Listen(context.Background(), "tcp", addr)
}
