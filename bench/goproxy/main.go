// Reference Go reverse proxy of the blog's design: httputil.ReverseProxy with
// FlushInterval -1 (flush after every write) and a large idle connection pool.
package main

import (
	"flag"
	"log"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"time"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:18001", "listen address")
	upstream := flag.String("upstream", "http://127.0.0.1:18000", "upstream base URL")
	flag.Parse()
	target, err := url.Parse(*upstream)
	if err != nil {
		log.Fatal(err)
	}
	proxy := httputil.NewSingleHostReverseProxy(target)
	proxy.FlushInterval = -1
	proxy.Transport = &http.Transport{
		Proxy:               nil,
		DialContext:         (&net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		MaxIdleConns:        10000,
		MaxIdleConnsPerHost: 10000,
		IdleConnTimeout:     90 * time.Second,
		DisableCompression:  true,
	}
	log.Printf("go reverse proxy on %s -> %s", *addr, *upstream)
	log.Fatal(http.ListenAndServe(*addr, proxy))
}
