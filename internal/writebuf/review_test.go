package writebuf_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/pgstore/pgstore/internal/writebuf"
)

// Three rules a review found broken, each kept as a test: the batches queued
// behind an unresolvable one fail at once; Close's ended context sends no
// more halves; the guard refuses at once even when the buffer is full.

// A batch that ends with ErrOutcomeUnknown does not set
// Buffer.failing, so the batches queued behind it whose deadline passed
// meanwhile are not failed at once, as they are behind a Transient failure:
// each is still sent, after its deadline, spends an attempt and a Resolve,
// and ends with ErrOutcomeUnknown though it need never have been sent. Eight
// one-write batches accepted together, a server that takes commits and
// never answers: the last fails about R + 2×MinAttempt per batch after its
// acceptance, not R + one attempt.
func TestAWriteQueuedBehindUnresolvableBatchesFailsNearItsOwnDeadline(t *testing.T) {
	hangLost := hang(writebuf.Unknown) // the commit goes out, no reply comes
	hangLost.answers = []answer{hangThenFail}
	s := newSink().otherwise(func(int, *writebuf.Batch) step { return hangLost })
	cfg := config()
	cfg.MaxBatch = 1
	cfg.RetryTimeout = retryTimeout
	b := start(t, cfg, s)

	accepted := time.Now()
	var results []*writebuf.Result
	for i := range 8 {
		results = append(results, enqueue(t, b, set(fmt.Sprint(i), 1, "v")))
	}
	for i, r := range results {
		t.Logf("write %d: %v", i, outcome(t, r))
	}
	last := time.Since(accepted)
	t.Logf("the last failed %v after its acceptance; the sink got %d Write calls and %d Resolve calls", last, len(s.Calls()), s.Resolves())

	require.Less(t, last, retryTimeout+minAttempt+slack, "about one retry timeout, not one per batch")
	require.Less(t, len(s.Calls()), 8, "batches whose deadline had passed were still sent")
	for i, r := range results[len(s.Calls()):] {
		require.NotErrorIs(t, outcome(t, r), writebuf.ErrOutcomeUnknown, "unsent write %d", i)
	}
}

// When Close's context ends while a batch too large for the
// server is being written in halves, the halves not yet sent are still
// handed to the sink, with the ended context: flush checks the context only
// between retries, and the loop only between batches. A sink that reports a
// context ended during a write as Unknown (as one must when it cannot tell
// whether the commit went out) then makes those unsent writes
// ErrOutcomeUnknown, where Close promises ErrClosed.
func TestCloseWhoseContextEndsWhileHalvingSendsNoMoreHalves(t *testing.T) {
	hangLost := hang(writebuf.Unknown)
	s := newSink().otherwise(func(_ int, b *writebuf.Batch) step {
		if b.Len() > 1 {
			return fail(writebuf.TooLarge)
		}
		return hangLost
	})
	cfg := config()
	cfg.Interval = time.Hour
	cfg.MaxBatch = 2
	cfg.RetryTimeout = time.Minute
	b := start(t, cfg, s)

	sent := enqueue(t, b, set("a", 1, "A"))
	unsent := enqueue(t, b, set("b", 1, "B"))
	require.Equal(t, 2, s.nextCall(t).size())
	require.Equal(t, []string{"a"}, s.nextCall(t).ids()) // the first half hangs
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Millisecond)
	defer cancel()
	require.ErrorIs(t, b.Close(ctx), context.DeadlineExceeded)

	require.ErrorIs(t, outcome(t, sent), writebuf.ErrOutcomeUnknown)
	err := outcome(t, unsent)
	require.Len(t, s.Calls(), 2, "the second half went to the sink after Close's context ended")
	require.ErrorIs(t, err, writebuf.ErrClosed)
	require.NotErrorIs(t, err, writebuf.ErrOutcomeUnknown)
}

// The guard refuses an older set "at once" only when the
// buffer has room: Enqueue first waits for room, and only then looks at the
// buffered set. A writer whose set the guard would refuse waits behind a
// full buffer, and if its context ends first it gets a "waiting for room"
// error instead of the conflict (and if room comes, the newer set may be out
// of the buffer by then, leaving the refusal to the server).
func TestTheGuardRefusesAnOlderSetAtOnceEvenWhenTheBufferIsFull(t *testing.T) {
	s := newSink()
	g := s.newGate()
	s.then(gated(g, commit()))
	var refused []string
	cfg := guarded(config(), &refused)
	cfg.Limit = oneWriteLimit
	b := start(t, cfg, s)

	enqueue(t, b, set("k", 5, value10))
	s.nextCall(t) // being written, so still buffered; and the buffer is full
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Millisecond)
	defer cancel()
	older := b.Enqueue(ctx, set("k", 3, value10))

	require.False(t, older.Accepted())
	require.ErrorIs(t, older.Wait(context.Background()), errConflict)
}

// Halving a batch that keeps timing out (a lock held elsewhere, not its
// size, may be why) stops at the deadline instead of going down to single
// records one statement timeout at a time.
func TestHalvingABatchStopsAtItsDeadline(t *testing.T) {
	s := newSink().otherwise(func(_ int, b *writebuf.Batch) step {
		return hang(writebuf.TooLarge) // every attempt runs out its time
	})
	cfg := config()
	cfg.Interval = 10 * time.Millisecond // one batch of all, due at once
	cfg.MaxBatch = 1024
	cfg.RetryTimeout = 100 * time.Millisecond
	cfg.MinAttempt = 20 * time.Millisecond
	b := start(t, cfg, s)
	var results []*writebuf.Result
	for i := range 1024 {
		results = append(results, enqueue(t, b, in("a", set(fmt.Sprint(i), 1, "v"))))
	}
	for _, r := range results {
		require.Error(t, outcome(t, r))
	}
	require.Less(t, len(s.Calls()), 10, "halves after the deadline are not sent: %v", s.Sizes())
}
