package backoff

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestWaitsDoubleFromTheMinimumWithJitterAndNeverPassTheMaximum(t *testing.T) {
	b := Backoff{Min: 100 * time.Millisecond, Max: time.Second}
	step := b.Min
	for range 20 {
		d := b.Next()
		require.GreaterOrEqual(t, d, step)
		require.LessOrEqual(t, d, min(step+step/2, b.Max))
		step = min(2*step, b.Max)
	}
	b.Reset()
	require.Less(t, b.Next(), 2*b.Min, "Reset starts over from the minimum")
}

func TestSleepReportsWhetherTheWholeWaitPassed(t *testing.T) {
	require.True(t, Sleep(context.Background(), time.Millisecond))
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	require.False(t, Sleep(ctx, time.Hour), "an ended context ends the wait")
}
