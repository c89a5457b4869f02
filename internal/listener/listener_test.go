package listener

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/pgstore/pgstore/internal/pgtest"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestBackoffDoublesWithJitterUpToTheMaximum(t *testing.T) {
	l := &Listener{MinBackoff: 100 * time.Millisecond, MaxBackoff: time.Second}
	d := l.minBackoff()
	for range 20 {
		prev := d
		d = l.nextBackoff(d)
		ceiling := min(2*prev, time.Second)
		require.GreaterOrEqual(t, d, ceiling/2)
		require.LessOrEqual(t, d, ceiling)
	}
}

// deepstream retried its initial connection in a hot loop.
func TestAServerThatCannotBeReachedIsRetriedWithBackoffNotInAHotLoop(t *testing.T) {
	const attempts = 4
	var times []time.Time // written by the loop's goroutine only
	fourth := make(chan struct{})
	l := &Listener{
		Connect: func(ctx context.Context) (*pgx.Conn, error) {
			times = append(times, time.Now())
			if len(times) == attempts {
				close(fourth)
			}
			return nil, errors.New("connection refused")
		},
		MinBackoff: 20 * time.Millisecond,
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); l.Run(ctx) }()
	<-fourth
	cancel()
	<-done
	// Every retry waited at least the minimum backoff (a hot loop waits
	// nothing; a slow machine can only wait longer).
	for i := 1; i < attempts; i++ {
		require.GreaterOrEqual(t, times[i].Sub(times[i-1]), l.MinBackoff, "attempt %d", i+1)
	}

	// Listen gives up when the loop has stopped, instead of hanging.
	require.ErrorIs(t, l.Listen(context.Background(), "ch"), ErrStopped)
}

// A server that accepts connections and then fails them (a standby refusing
// LISTEN, a pooler) is retried with backoff too.
func TestAConnectionThatFailsAtOnceIsRetriedWithBackoff(t *testing.T) {
	url := pgtest.URL(t)
	const attempts = 4
	var times []time.Time // written by the loop's goroutine only
	fourth := make(chan struct{})
	l := &Listener{
		Connect: func(ctx context.Context) (*pgx.Conn, error) {
			conn, err := pgx.Connect(ctx, url)
			if err != nil {
				return nil, err
			}
			times = append(times, time.Now())
			if len(times) == attempts {
				close(fourth)
			}
			conn.Close(ctx) // dead before its first LISTEN
			return conn, nil
		},
		MinBackoff: 20 * time.Millisecond,
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); l.Run(ctx) }()
	listened := make(chan error, 1)
	go func() { listened <- l.Listen(ctx, "ch") }()
	<-fourth
	cancel()
	<-done
	require.Error(t, <-listened)
	for i := 1; i < attempts; i++ {
		require.GreaterOrEqual(t, times[i].Sub(times[i-1]), l.MinBackoff, "attempt %d", i+1)
	}
}
