// Mock OpenAI-compatible upstream for the llmgate benchmark (stdlib only).
//
// POST /v1/chat/completions streams: a role chunk, N content chunks of one short
// word each, a finish chunk, a usage chunk if stream_options.include_usage, and
// "data: [DONE]", flushing after every event. N and the delay between content
// chunks come from the headers x-mock-tokens and x-mock-delay-ms (fallbacks:
// body max_tokens, then the -tokens/-delay-ms flags). A stream id comes from
// x-mock-id (fallback: body "user"); it keys the cancellation record.
//
// GET /stats   -> {"started","completed","cancelled","active","cancel_gap_ms_p50","cancel_gap_ms_p99"}
// GET /cancels -> {"<id>": <unix ns when the closed client connection was detected>, ...}
// POST /reset  -> clears counters and records.
package main

import (
	"encoding/json"
	"flag"
	"io"
	"log"
	"net/http"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

var words = []string{" the", " quick", " brown", " fox", " jumps", " over", " a", " lazy", " dog", " and"}

type stats struct {
	started, completed, cancelled, active int64
	mu                                    sync.Mutex
	gaps                                  []float64 // ms from the last event write to detecting the close
	cancels                               map[string]int64
}

var st = &stats{cancels: map[string]int64{}}

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
	flag.Parse()
	mux := http.NewServeMux()
	mux.HandleFunc("/v1/chat/completions", func(w http.ResponseWriter, r *http.Request) {
		chat(w, r, *defTokens, *defDelay)
	})
	mux.HandleFunc("/stats", func(w http.ResponseWriter, r *http.Request) {
		st.mu.Lock()
		out := map[string]interface{}{
			"started": atomic.LoadInt64(&st.started), "completed": atomic.LoadInt64(&st.completed),
			"cancelled": atomic.LoadInt64(&st.cancelled), "active": atomic.LoadInt64(&st.active),
			"cancel_gap_ms_p50": pct(st.gaps, 0.5), "cancel_gap_ms_p99": pct(st.gaps, 0.99),
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
		st.gaps, st.cancels = nil, map[string]int64{}
		st.mu.Unlock()
		io.WriteString(w, "{}\n")
	})
	log.Printf("mock upstream on %s", *addr)
	log.Fatal(http.ListenAndServe(*addr, mux))
}
