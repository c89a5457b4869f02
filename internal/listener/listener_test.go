package listener

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/pgstore/pgstore/internal/pgtest"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// run runs l's loop on a goroutine of its own until stop, which returns once
// Run has; the test's end stops it too.
func run(t *testing.T, l *Listener) (ctx context.Context, stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); l.Run(ctx) }()
	stop = func() { cancel(); <-done }
	t.Cleanup(stop)
	return ctx, stop
}

// listening waits until l says it listens, and returns its state. The loop
// marks itself listening once the channels are listened on, just after it
// lets Listen return.
func listening(t *testing.T, l *Listener) State {
	t.Helper()
	require.Eventually(t, func() bool { return l.State().Listening }, 10*time.Second, time.Millisecond)
	return l.State()
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
	_, stop := run(t, l)
	<-fourth
	stop()
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
	ctx, stop := run(t, l)
	listened := make(chan error, 1)
	go func() { listened <- l.Listen(ctx, "ch") }()
	<-fourth
	stop()
	require.Error(t, <-listened)
	for i := 1; i < attempts; i++ {
		require.GreaterOrEqual(t, times[i].Sub(times[i-1]), l.MinBackoff, "attempt %d", i+1)
	}
}

// countListens is a pgx tracer that counts the LISTEN statements completed.
type countListens struct{ done atomic.Int32 }

func (c *countListens) TraceQueryStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceQueryStartData) context.Context {
	return ctx
}

func (c *countListens) TraceQueryEnd(_ context.Context, _ *pgx.Conn, d pgx.TraceQueryEndData) {
	if d.Err == nil && strings.HasPrefix(d.CommandTag.String(), "LISTEN") {
		c.done.Add(1)
	}
}

// After a lost connection, Reconnected comes only once the new connection
// listens again: a subscriber that re-reads then misses no change made after
// its re-read. Reconnected runs on the loop's goroutine, so what it sees is
// exactly what was done before it.
func TestReconnectedComesOnlyOnceListeningAgain(t *testing.T) {
	url := pgtest.URL(t)
	listens := &countListens{}
	pids := make(chan uint32, 2)
	listensAtReconnect := make(chan int32, 1)
	l := &Listener{
		Connect: func(ctx context.Context) (*pgx.Conn, error) {
			cfg, err := pgx.ParseConfig(url)
			if err != nil {
				return nil, err
			}
			cfg.Tracer = listens
			conn, err := pgx.ConnectConfig(ctx, cfg)
			if err == nil {
				pids <- conn.PgConn().PID()
			}
			return conn, err
		},
		Reconnected: func() { listensAtReconnect <- listens.done.Load() },
		MinBackoff:  10 * time.Millisecond,
	}
	ctx, stop := run(t, l)
	require.NoError(t, l.Listen(ctx, "a"))
	require.NoError(t, l.Listen(ctx, "b"))
	require.EqualValues(t, 2, listens.done.Load())
	first := listening(t, l)
	require.True(t, first.Listening)
	require.Zero(t, first.Reconnects)

	admin, err := pgx.Connect(ctx, url)
	require.NoError(t, err)
	defer admin.Close(ctx)
	_, err = admin.Exec(ctx, "SELECT pg_terminate_backend($1)", <-pids)
	require.NoError(t, err)
	select {
	case n := <-listensAtReconnect:
		require.EqualValues(t, 4, n, "both channels listened on again before Reconnected")
	case <-time.After(15 * time.Second):
		t.Fatal("no Reconnected after the connection was terminated")
	}
	again := l.State()
	require.True(t, again.Listening)
	require.Equal(t, int64(1), again.Reconnects)
	require.True(t, again.Since.After(first.Since), "listening since the new connection")
	stop()
	require.False(t, l.State().Listening, "once Run returned")
}

// An idle connection is pinged: a healthy one stays, one that has gone
// silent (its replies lost, as over a network that dropped the server) is
// replaced, and Reconnected comes.
func TestAnIdleConnectionIsPingedAndASilentOneReplaced(t *testing.T) {
	proxy, url := pgtest.NewProxy(t)
	reconnected := make(chan struct{}, 8) // Run must not block on it
	pings := make(pingsSent, 16)
	l := &Listener{
		Connect: func(ctx context.Context) (*pgx.Conn, error) {
			conn, err := pgx.Connect(ctx, url)
			if err == nil {
				conn.PgConn().Frontend().Trace(pings, pgproto3.TracerOptions{SuppressTimestamps: true})
			}
			return conn, err
		},
		Reconnected: func() { reconnected <- struct{}{} },
		PingAfter:   20 * time.Millisecond,
		PingTimeout: 200 * time.Millisecond,
		MinBackoff:  10 * time.Millisecond,
	}
	ctx, _ := run(t, l)
	require.NoError(t, l.Listen(ctx, "a"))
	before := listening(t, l)

	// Idle periods, each ending in a ping: the loop sends the next only
	// once the last was answered.
	const answered = 3
	for i := range answered + 1 {
		select {
		case <-pings:
		case <-time.After(10 * time.Second):
			t.Fatalf("only %d pings sent", i)
		}
	}
	require.Equal(t, before, l.State(), "answered pings keep the connection")
	require.True(t, before.Listening)

	proxy.HoldReplies() // the open connection goes silent; new ones pass
	select {
	case <-reconnected:
	case <-time.After(15 * time.Second):
		t.Fatal("a connection whose pings go unanswered was never replaced")
	}
	require.Equal(t, int64(1), l.State().Reconnects)
	require.True(t, l.State().Listening)
}

// pingsSent is a trace writer (see pgproto3.Frontend.Trace) that signals each
// ping its connection sends, dropping the signals nobody waits for.
type pingsSent chan struct{}

func (p pingsSent) Write(msg []byte) (int, error) {
	if bytes.Contains(msg, []byte("\tQuery\t")) && bytes.Contains(msg, []byte(`"-- ping"`)) {
		select {
		case p <- struct{}{}:
		default:
		}
	}
	return len(msg), nil
}
