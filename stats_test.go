package pgstore_test

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/pgstore/pgstore"
	"github.com/pgstore/pgstore/internal/pgtest"
)

func TestStatsCountWritesFailuresAndTheListener(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	// The NOTIFY feed, whose Resync after a lost LISTEN connection is
	// counted.
	c, schema := connectNamed(t, pgstore.WithVersionGuard(true), pgstore.WithoutChangeLog())
	st := c.Stats()
	require.Zero(t, st.Flushes)
	require.False(t, st.Listener.Listening, "no LISTEN connection before the first Subscribe")
	require.Nil(t, st.Log)
	waitUntil(t, ctx, "the janitor measures the notification queue", func() bool { return !c.Stats().NotifyQueueAt.IsZero() })
	require.Less(t, c.Stats().NotifyQueueUsage, 0.5)

	got := newEventLog()
	sub, err := c.Subscribe(ctx, got.handle)
	require.NoError(t, err)
	defer sub.Close(context.Background())
	require.NoError(t, c.Set(ctx, "t/a", 2, "a"))
	require.NoError(t, c.Set(ctx, "t/b", 1, "b"))
	require.ErrorIs(t, c.Set(ctx, "t/a", 1, "stale"), pgstore.ErrVersionConflict)
	got.waitFor(t, 3) // CREATE_TABLE and two INSERTs

	st = c.Stats()
	require.Equal(t, int64(2), st.DurableWrites)
	require.Equal(t, int64(1), st.FailedWrites.Refused, "the stale version")
	require.GreaterOrEqual(t, st.Flushes, int64(3))
	require.Positive(t, st.FlushTime)
	require.Zero(t, st.BufferedWrites)
	require.True(t, st.Listener.Listening)
	require.Equal(t, 1, st.Subscriptions)
	require.Equal(t, int64(3), st.EventsDelivered)

	// A lost LISTEN connection is replaced, and counted.
	pids := listenerPIDs(t, schema)
	require.Len(t, pids, 1)
	_, err = pgtest.Pool(t).Exec(ctx, "SELECT pg_terminate_backend($1)", pids[0])
	require.NoError(t, err)
	waitUntil(t, ctx, "the listener reconnects", func() bool {
		l := c.Stats().Listener
		return l.Listening && l.Reconnects == 1
	})
	waitUntil(t, ctx, "the Resync of the reconnection", func() bool { return c.Stats().Resyncs == 1 })

	sub.Close(context.Background())
	require.Zero(t, c.Stats().Subscriptions)
}

func TestStatsCountTheWritesThatCloseFails(t *testing.T) {
	t.Parallel()
	c, err := pgstore.Connect(context.Background(), pgtest.URL(t), pgstore.WithSchema(pgtest.Schema(t)), pgstore.WithWriteInterval(time.Hour))
	require.NoError(t, err)
	r := c.SetAsync(testCtx(t), "t/k", 1, "never sent")
	ended, cancel := context.WithCancel(context.Background())
	cancel()
	require.Error(t, c.Close(ended))
	require.ErrorIs(t, r.Wait(testCtx(t)), pgstore.ErrClosed)
	require.Equal(t, int64(1), c.Stats().FailedWrites.Closed)
	require.Zero(t, c.Stats().BufferedWrites, "nothing left buffered")
}

func TestStatsShowTheLogAndHowFarASlowSubscriptionIsBehind(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c := connect(t, pgstore.WithChangeLog(time.Hour))
	require.NoError(t, c.Set(ctx, "t/k", 0, "first"))
	_, before, err := c.List(ctx, "t", "", 1)
	require.NoError(t, err)
	for i := range 10 {
		require.NoError(t, c.Set(ctx, "t/k", int64(i+1), i))
	}
	release := make(chan struct{})
	first := make(chan struct{})
	delivered := 0
	sub, err := c.Subscribe(ctx, func(pgstore.Event) {
		if delivered++; delivered == 1 {
			close(first)
			<-release
		}
	}, pgstore.After(before))
	require.NoError(t, err)
	defer sub.Close(context.Background())
	<-first
	st := c.Stats()
	require.Len(t, st.Log.Lags, 1)
	require.Equal(t, int64(10), st.Log.Lags[0].Entries, "held by its handler at the first of ten entries")
	require.Positive(t, st.Log.Lags[0].Behind)
	require.Equal(t, c.Schema(), st.Log.Lags[0].Schema)
	waitUntil(t, ctx, "the janitor measures the log", func() bool { return !c.Stats().Log.BytesAt.IsZero() })
	require.Positive(t, c.Stats().Log.Bytes)
	close(release)
	waitUntil(t, ctx, "the subscription catches up", func() bool {
		lags := c.Stats().Log.Lags
		return lags[0].Entries == 0 && lags[0].Behind == 0
	})
	require.Equal(t, int64(10), c.Stats().EventsDelivered)
}
