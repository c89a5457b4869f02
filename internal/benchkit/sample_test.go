package benchkit

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestConcurrentlyCallsEachIOnceAndReturnsTheFirstError(t *testing.T) {
	var mu sync.Mutex
	seen := make(map[int]int)
	rate, err := Concurrently(context.Background(), 3, 10, func(_ context.Context, i int) error {
		mu.Lock()
		seen[i]++
		mu.Unlock()
		return nil
	})
	require.NoError(t, err)
	require.Positive(t, rate)
	require.Len(t, seen, 10)
	for i, n := range seen {
		require.Equal(t, 1, n, "i %d", i)
	}

	// The others, cancelled by the first error, fail with the context's:
	// theirs is not the one returned.
	bad := errors.New("bad")
	_, err = Concurrently(context.Background(), 4, 100, func(ctx context.Context, i int) error {
		if i == 1 { // goroutine 1's first
			return bad
		}
		<-ctx.Done()
		return ctx.Err()
	})
	require.ErrorIs(t, err, bad)
}

func TestSampleKeepsWhatItIsToldToAndCountsTheUnheard(t *testing.T) {
	s := NewSide("side")
	s.Write = func(_ context.Context, i int) error {
		if i%2 == 0 {
			s.Hear()
		}
		return nil
	}
	ctx := context.Background()
	require.NoError(t, s.Sample(ctx, 0, false, time.Minute)) // heard, not kept
	require.NoError(t, s.Sample(ctx, 2, true, time.Minute))  // heard, kept
	require.NoError(t, s.Sample(ctx, 3, true, time.Millisecond))
	require.Len(t, s.Event, 1)
	require.Len(t, s.Wrote, 1)
	require.Equal(t, 1, s.Lost)

	s.Write = func(context.Context, int) error { return errors.New("refused") }
	require.EqualError(t, s.Sample(ctx, 4, true, time.Minute), "side: refused")
}

// A side that heard nothing ends the figure with an error; one that lost some
// samples gets a note, and the figure goes on.
func TestCheckHeardFailsOnASideThatHeardNothingAndNotesLosses(t *testing.T) {
	rep := &Report{}
	lossy := &Side{Name: "lossy", Event: []time.Duration{time.Millisecond}, Lost: 2}
	whole := &Side{Name: "whole", Event: []time.Duration{time.Millisecond}}
	require.NoError(t, CheckHeard(rep, "latency", "publications", 3, time.Second, lossy, whole))
	require.Equal(t, []string{"latency: lossy lost 2 of 3 publications (not heard within 1s)"}, rep.notes)

	deaf := &Side{Name: "deaf"}
	require.EqualError(t, CheckHeard(rep, "latency", "publications", 3, time.Second, whole, deaf), "deaf: none of 3 publications heard")
}
