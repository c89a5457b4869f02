// Package backoff is pgstore's one way of waiting between retries:
// exponential, with jitter so that many nodes that failed together do not
// retry in step.
package backoff

import (
	"context"
	"math/rand/v2"
	"time"
)

// A Backoff yields growing waits. Its zero value is not usable: set Min and
// Max.
type Backoff struct {
	Min, Max time.Duration
	cur      time.Duration
}

// Next returns the next wait: never less than Min nor more than Max, it
// doubles from Min with every call, plus up to half as much again of
// jitter.
func (b *Backoff) Next() time.Duration {
	if b.cur == 0 {
		b.cur = b.Min
	}
	d := b.cur
	b.cur = min(2*b.cur, b.Max)
	return min(d+rand.N(d/2+1), b.Max)
}

// Reset starts the waits over from Min.
func (b *Backoff) Reset() { b.cur = 0 }

// Sleep waits for d or until ctx ends, and reports whether the whole wait
// passed.
func Sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}
