package main

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"time"
)

// healthTimeout bounds the store's ping: a database that takes longer to
// answer an empty statement (or a pool that takes longer to lend a
// connection) cannot serve the node's clients either.
const healthTimeout = time.Second

// serveHealth answers 200 "ok" when the node can serve its clients, and 503
// with the reasons, one a line, when it cannot.
func (s *Server) serveHealth(w http.ResponseWriter, r *http.Request) {
	if !getOrHead(w, r) {
		return
	}
	h := w.Header()
	h.Set("Content-Type", "text/plain; charset=utf-8")
	h.Set("Cache-Control", "no-store")
	reasons := s.unhealthy(r.Context())
	if len(reasons) == 0 {
		w.Write([]byte("ok\n"))
		return
	}
	w.WriteHeader(http.StatusServiceUnavailable)
	w.Write([]byte(strings.Join(reasons, "\n") + "\n"))
}

// unhealthy returns why the node cannot serve, if it cannot: it is closing,
// its change feed is not started or does not listen (the storage's Stats
// say; changes made meanwhile reach its clients late, or, without a change
// log, only after a Resync), or its store does not answer a ping within
// healthTimeout. The ping, rather than the time of the last flush, because
// an idle node flushes nothing and yet must be known to be connected; it is
// an empty statement on a pooled connection, one round trip.
func (s *Server) unhealthy(ctx context.Context) []string {
	s.mu.Lock()
	closed := s.closed
	s.mu.Unlock()
	if closed {
		return []string{"server closing"}
	}
	var reasons []string
	if !s.feedStarted() {
		reasons = append(reasons, "change feed: not started")
	} else if src, ok := s.storage.(StatsSource); ok {
		if l := src.Stats().Listener; !l.Listening {
			reason := "change feed: not listening"
			if !l.Since.IsZero() {
				reason += fmt.Sprintf(" (lost %s ago)", time.Since(l.Since).Round(time.Millisecond))
			}
			reasons = append(reasons, reason)
		}
	}
	if p, ok := s.storage.(Pinger); ok {
		ctx, cancel := context.WithTimeout(ctx, healthTimeout)
		err := p.Ping(ctx)
		cancel()
		if err != nil {
			// pgconn's errors may span lines (one per address tried).
			reasons = append(reasons, "store: "+strings.Join(strings.Fields(err.Error()), " "))
		}
	}
	return reasons
}
