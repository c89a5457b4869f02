package main

import (
	"sync"
	"sync/atomic"
	"time"

	"github.com/centrifugal/centrifuge"

	"github.com/pgstore/pgstore/internal/benchkit"
)

// A handler is a node's centrifuge.BrokerEventHandler: it counts the
// publications of each channel, and tells when the one it watches for
// arrives.
type handler struct {
	mu     sync.Mutex
	counts map[string]int
	more   chan struct{} // a publication was counted

	// watched is the channel whose publication with data want side hears.
	watched string
	want    atomic.Pointer[string]
	side    *benchkit.Side
}

var _ centrifuge.BrokerEventHandler = (*handler)(nil)

func newHandler(watched string) *handler {
	return &handler{counts: make(map[string]int), more: make(chan struct{}, 1), watched: watched, side: benchkit.NewSide(watched)}
}

func (h *handler) HandlePublication(ch string, pub *centrifuge.Publication, _ centrifuge.StreamPosition, _ bool, _ *centrifuge.Publication) error {
	if ch == h.watched {
		if w := h.want.Load(); w != nil && string(pub.Data) == *w {
			h.side.Hear()
		}
		return nil
	}
	h.mu.Lock()
	h.counts[ch]++
	h.mu.Unlock()
	select {
	case h.more <- struct{}{}:
	default:
	}
	return nil
}

func (h *handler) HandleJoin(string, *centrifuge.ClientInfo) error  { return nil }
func (h *handler) HandleLeave(string, *centrifuge.ClientInfo) error { return nil }

func (h *handler) count(ch string) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.counts[ch]
}

// waitCount waits until ch's publications reach n, for at most timeout, and
// returns how many there were.
func (h *handler) waitCount(ch string, n int, timeout time.Duration) int {
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	for {
		if got := h.count(ch); got >= n {
			return got
		}
		select {
		case <-h.more:
		case <-timer.C:
			return h.count(ch)
		}
	}
}
