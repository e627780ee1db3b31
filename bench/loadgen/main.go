// Load generator for the llmgate benchmark (stdlib only).
//
// Opens -c streaming chat requests to -url, ramped in evenly over -ramp, and
// measures per stream: TTFT (request start to the first data event with a
// non-empty delta content), gaps between consecutive content events, total
// time, events and tokens received, errors. With -abort-after K each stream is
// closed by the client after K content events; with -cancels URL the upstream's
// detection times are fetched and matched to the abort times by stream id.
// -hold D keeps the -c streams open for D (closed loop: each client starts a new
// stream when its stream ends); -rate R with -duration D starts R streams a
// second whatever the earlier ones are doing (open loop). Prints one JSON summary on stdout.
//
// Shards: one process holds one socket per stream, and the hard RLIMIT_NOFILE
// is per process, so a runner starts K load generators with -shard 0..K-1, each
// with its share of -c over the same -ramp. -samples PATH writes the raw
// per-stream samples (ms) for an exact merge of the percentiles; -cancels takes
// a comma-separated list of upstream shards' /cancels URLs.
package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

type result struct {
	ttft, total   time.Duration
	gaps          []time.Duration
	events, toks  int
	err           string
	abortedAtNano int64
	id            string
}

var (
	open, peakOpen int64
	failed         int32
)

func hasContent(line []byte) bool {
	i := bytes.Index(line, []byte(`"content":`))
	if i < 0 {
		return false
	}
	rest := bytes.TrimLeft(line[i+10:], " ")
	if len(rest) >= 2 && rest[0] == '"' {
		return rest[1] != '"'
	}
	if bytes.HasPrefix(rest, []byte("null")) {
		return false
	}
	// unusual formatting: fall back to a real parse
	var c struct {
		Choices []struct {
			Delta struct {
				Content string `json:"content"`
			} `json:"delta"`
		} `json:"choices"`
	}
	return json.Unmarshal(line, &c) == nil && len(c.Choices) > 0 && c.Choices[0].Delta.Content != ""
}

func stream(ctx context.Context, client *http.Client, url string, body []byte, hdr http.Header, id string, abortAfter int) (res result) {
	res.id = id
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "POST", url, bytes.NewReader(body))
	req.Header = hdr.Clone()
	req.Header.Set("x-mock-id", id)
	start := time.Now()
	resp, err := client.Do(req)
	if err != nil {
		res.err = "request: " + err.Error()
		return
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 300))
		res.err = fmt.Sprintf("status %d: %s", resp.StatusCode, bytes.TrimSpace(b))
		return
	}
	cur := atomic.AddInt64(&open, 1)
	for {
		p := atomic.LoadInt64(&peakOpen)
		if cur <= p || atomic.CompareAndSwapInt64(&peakOpen, p, cur) {
			break
		}
	}
	defer atomic.AddInt64(&open, -1)
	br := bufio.NewReaderSize(resp.Body, 4096)
	var lastTok time.Time
	done := false
	for {
		line, err := br.ReadSlice('\n')
		if len(line) > 6 && bytes.HasPrefix(line, []byte("data:")) {
			now := time.Now()
			res.events++
			data := bytes.TrimSpace(line[5:])
			if bytes.Equal(data, []byte("[DONE]")) {
				done = true
				break
			}
			if hasContent(data) {
				if res.toks == 0 {
					res.ttft = now.Sub(start)
				} else {
					res.gaps = append(res.gaps, now.Sub(lastTok))
				}
				lastTok = now
				res.toks++
				if abortAfter > 0 && res.toks >= abortAfter {
					res.abortedAtNano = time.Now().UnixNano()
					cancel()
					resp.Body.Close()
					res.total = time.Since(start)
					return
				}
			}
		}
		if err == bufio.ErrBufferFull {
			continue
		}
		if err != nil {
			if err != io.EOF {
				res.err = "read: " + err.Error()
			}
			break
		}
	}
	res.total = time.Since(start)
	if !done && res.err == "" {
		res.err = "truncated: no [DONE]"
	}
	return
}

func pcts(xs []float64) map[string]float64 {
	out := map[string]float64{"n": float64(len(xs))}
	if len(xs) == 0 {
		return out
	}
	sort.Float64s(xs)
	at := func(p float64) float64 { return round3(xs[int(p*float64(len(xs)-1)+0.5)]) }
	out["p50"], out["p90"], out["p99"], out["max"] = at(0.5), at(0.9), at(0.99), round3(xs[len(xs)-1])
	return out
}

func round3(x float64) float64   { return float64(int64(x*1000+0.5)) / 1000 }
func ms(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e6 }

func cpuSeconds() float64 {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return float64(ru.Utime.Nano()+ru.Stime.Nano()) / 1e9
}

// fetchCancels reads the detection times from every URL (upstream shards),
// merged into one map, until it holds want entries or wait has passed.
func fetchCancels(urls string, want int, wait time.Duration) map[string]int64 {
	m := map[string]int64{}
	deadline := time.Now().Add(wait)
	for {
		for _, url := range strings.Split(urls, ",") {
			if resp, err := http.Get(url); err == nil {
				json.NewDecoder(resp.Body).Decode(&m)
				resp.Body.Close()
			}
		}
		if len(m) >= want || time.Now().After(deadline) {
			return m
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func main() {
	url := flag.String("url", "http://127.0.0.1:18000/v1/chat/completions", "target URL")
	conc := flag.Int("c", 10, "concurrent streams")
	tokens := flag.Int("tokens", 20, "content chunks per stream (x-mock-tokens)")
	delayMs := flag.Int("delay-ms", 10, "delay between chunks (x-mock-delay-ms)")
	ramp := flag.Duration("ramp", time.Second, "window over which the streams are started")
	keepAlive := flag.Bool("keepalive", false, "reuse connections (HTTP/1.1 keep-alive)")
	abortAfter := flag.Int("abort-after", 0, "close each stream after K content events (0 = read to the end)")
	cancelsURL := flag.String("cancels", "", "upstream /cancels URL(s), comma-separated, for cancellation latency (with -abort-after)")
	timeout := flag.Duration("timeout", 120*time.Second, "per-stream timeout")
	stopOnError := flag.Bool("stop-on-error", false, "stop starting streams after the first error (ramp until failure)")
	model := flag.String("model", "gpt-4o-mini", "model name in the body")
	usage := flag.Bool("include-usage", true, "send stream_options.include_usage")
	hold := flag.Duration("hold", 0, "closed loop: each of the -c clients starts a new stream when one ends until this long after the start (0 = one stream each)")
	rate := flag.Float64("rate", 0, "open loop: start this many streams a second for -duration, not waiting for earlier ones (-c and -ramp are ignored)")
	runFor := flag.Duration("duration", 10*time.Second, "with -rate: how long to keep starting streams")
	timeline := flag.Duration("timeline", 100*time.Millisecond, "interval of the open-streams timeline (0 = off)")
	shard := flag.Int("shard", -1, "this process's shard number (part of the stream ids, so shards' ids differ)")
	samplesPath := flag.String("samples", "", "write the raw samples (ms) to this file as JSON, for merging shards")
	flag.Parse()

	tr := &http.Transport{
		DialContext:         (&net.Dialer{Timeout: 30 * time.Second}).DialContext,
		DisableKeepAlives:   !*keepAlive,
		DisableCompression:  true,
		MaxIdleConnsPerHost: *conc,
		ForceAttemptHTTP2:   false,
	}
	client := &http.Client{Transport: tr}
	hdr := http.Header{}
	hdr.Set("Content-Type", "application/json")
	hdr.Set("Authorization", "Bearer bench")
	hdr.Set("x-mock-tokens", strconv.Itoa(*tokens))
	hdr.Set("x-mock-delay-ms", strconv.Itoa(*delayMs))
	runID := strconv.FormatInt(time.Now().UnixNano(), 36)
	if *shard >= 0 {
		runID += "s" + strconv.Itoa(*shard)
	}

	var tl [][2]float64
	stopTL := make(chan struct{})
	var tlWG sync.WaitGroup
	if *timeline > 0 {
		tlWG.Add(1)
		go func() {
			defer tlWG.Done()
			t := time.NewTicker(*timeline)
			defer t.Stop()
			for {
				select {
				case <-stopTL:
					return
				case now := <-t.C:
					tl = append(tl, [2]float64{float64(now.UnixNano()) / 1e9, float64(atomic.LoadInt64(&open))})
				}
			}
		}()
	}

	var (
		results  []result
		resMu    sync.Mutex
		wg       sync.WaitGroup
		launched int64
	)
	keep := func(r result) {
		if r.err != "" {
			atomic.AddInt32(&failed, 1)
		}
		resMu.Lock()
		results = append(results, r)
		resMu.Unlock()
	}
	newID := func(n int64) (string, []byte) {
		id := runID + "-" + strconv.FormatInt(n, 10)
		body, _ := json.Marshal(map[string]interface{}{
			"model": *model, "stream": true, "user": id, "max_tokens": *tokens,
			"messages":       []map[string]string{{"role": "user", "content": "Say something."}},
			"stream_options": map[string]bool{"include_usage": *usage},
		})
		return id, body
	}
	one := func(n int64) (ok bool) {
		id, body := newID(n)
		ctx, cancel := context.WithTimeout(context.Background(), *timeout)
		defer cancel()
		r := stream(ctx, client, *url, body, hdr, id, *abortAfter)
		keep(r)
		return r.err == ""
	}
	t0 := time.Now()
	switch {
	case *rate > 0:
		// Open loop: request i starts at t0 + i/rate whatever the earlier ones
		// are doing, so a slow peer gets the same arrivals as a fast one.
		n := int64(*rate * runFor.Seconds())
		for i := int64(0); i < n; i++ {
			if *stopOnError && atomic.LoadInt32(&failed) > 0 {
				break
			}
			if d := time.Until(t0.Add(time.Duration(float64(i) / *rate * 1e9))); d > 0 {
				time.Sleep(d)
			}
			wg.Add(1)
			launched++
			go func(i int64) { defer wg.Done(); one(i) }(i)
		}
	default:
		// Closed loop: -c clients ramped in over -ramp; with -hold each client
		// starts a new stream when its stream ends until -hold has passed since
		// t0 (without -hold, one stream each).
		for i := 0; i < *conc; i++ {
			if *stopOnError && atomic.LoadInt32(&failed) > 0 {
				break
			}
			if *conc > 1 {
				if d := time.Until(t0.Add(*ramp * time.Duration(i) / time.Duration(*conc-1))); d > 0 {
					time.Sleep(d)
				}
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					if !one(atomic.AddInt64(&launched, 1)-1) && *hold > 0 {
						time.Sleep(100 * time.Millisecond) // bound the retries against a dead peer
					}
					if *hold <= 0 || time.Since(t0) >= *hold || (*stopOnError && atomic.LoadInt32(&failed) > 0) {
						return
					}
				}
			}()
		}
	}
	rampEnd := time.Now()
	wg.Wait()
	wall := time.Since(t0)
	close(stopTL)
	tlWG.Wait()

	var ttfts, gaps, totals []float64
	events, toks, okStreams := 0, 0, 0
	errs := map[string]int{}
	aborted := map[string]int64{}
	for _, r := range results {
		events += r.events
		toks += r.toks
		if r.err != "" {
			k := r.err
			if len(k) > 120 {
				k = k[:120]
			}
			errs[k]++
			continue
		}
		okStreams++
		if r.toks > 0 {
			ttfts = append(ttfts, ms(r.ttft))
		}
		for _, g := range r.gaps {
			gaps = append(gaps, ms(g))
		}
		totals = append(totals, ms(r.total))
		if r.abortedAtNano > 0 {
			aborted[r.id] = r.abortedAtNano
		}
	}
	nErr := 0
	for _, n := range errs {
		nErr += n
	}
	raw := map[string][]float64{}
	if *samplesPath != "" {
		// copies: pcts sorts in place, and rounds; the merge rounds the same way
		raw["ttft_ms"] = append([]float64{}, ttfts...)
		raw["gap_ms"] = append([]float64{}, gaps...)
		raw["total_ms"] = append([]float64{}, totals...)
	}
	out := map[string]interface{}{
		"url": *url, "concurrency": *conc, "launched": launched, "tokens": *tokens, "delay_ms": *delayMs,
		"ramp_s": ramp.Seconds(), "hold_s": hold.Seconds(), "rate": *rate, "keepalive": *keepAlive, "abort_after": *abortAfter,
		"ok_streams": okStreams, "errors": nErr, "error_kinds": errs,
		"events": events, "tokens_received": toks, "peak_open": atomic.LoadInt64(&peakOpen),
		"ttft_ms": pcts(ttfts), "gap_ms": pcts(gaps), "total_ms": pcts(totals),
		"wall_s": round3(wall.Seconds()), "start_unix": float64(t0.UnixNano()) / 1e9,
		"ramp_end_unix": float64(rampEnd.UnixNano()) / 1e9, "loadgen_cpu_s": round3(cpuSeconds()),
		"open_timeline": tl,
	}
	if *abortAfter > 0 && *cancelsURL != "" {
		seen := fetchCancels(*cancelsURL, len(aborted), 3*time.Second)
		var lat []float64
		missing := 0
		for id, at := range aborted {
			if det, ok := seen[id]; ok {
				lat = append(lat, float64(det-at)/1e6)
			} else {
				missing++
			}
		}
		raw["cancel_ms"] = append([]float64{}, lat...)
		out["cancel_ms"] = pcts(lat)
		out["aborted"] = len(aborted)
		out["cancel_not_seen"] = missing
	}
	if *samplesPath != "" {
		f, err := os.Create(*samplesPath)
		if err == nil {
			err = json.NewEncoder(f).Encode(raw)
			if cerr := f.Close(); err == nil {
				err = cerr
			}
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "samples:", err)
			os.Exit(1)
		}
	}
	enc := json.NewEncoder(os.Stdout)
	enc.Encode(out)
}
