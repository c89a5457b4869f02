package main

import (
	"sync"
	"sync/atomic"
	"time"

	"github.com/centrifugal/centrifuge"
)

// A handler is a node's centrifuge.BrokerEventHandler: it counts the
// publications of each channel, and tells when the one it watches for
// arrives.
type handler struct {
	mu     sync.Mutex
	counts map[string]int
	more   chan struct{} // a publication was counted

	// watched is the channel whose publication with data want is reported
	// on heard, with the time it arrived.
	watched string
	want    atomic.Pointer[string]
	heard   chan time.Time
}

var _ centrifuge.BrokerEventHandler = (*handler)(nil)

func newHandler(watched string) *handler {
	return &handler{counts: make(map[string]int), more: make(chan struct{}, 1), watched: watched, heard: make(chan time.Time, 1)}
}

func (h *handler) HandlePublication(ch string, pub *centrifuge.Publication, _ centrifuge.StreamPosition, _ bool, _ *centrifuge.Publication) error {
	at := time.Now()
	if ch == h.watched {
		if w := h.want.Load(); w != nil && string(pub.Data) == *w {
			select {
			case h.heard <- at:
			default:
			}
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
