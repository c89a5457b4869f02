package pgstore_test

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/pgstore/pgstore"
	"github.com/pgstore/pgstore/internal/pgtest"
)

// Switching a schema's feed to the change log, while others write and
// subscribe, loses nothing: until every table appends to the log, the NOTIFY
// feed serves.

// waitForEvent waits until got holds an event that match accepts.
func waitForEvent(t *testing.T, got *eventLog, match func(pgstore.Event) bool) {
	t.Helper()
	for n := 1; ; n++ {
		if events := got.waitFor(t, n); match(events[n-1]) {
			return
		}
	}
}

func keyIs(key string) func(pgstore.Event) bool {
	return func(e pgstore.Event) bool { return e.Key == key }
}

func TestASwitchToTheLogThatStopsHalfwayLosesNothing(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	schema := pgtest.Schema(t)
	plain := connectSchema(t, schema, pgstore.WithoutChangeLog())
	require.NoError(t, plain.Set(ctx, "t/a", 1, 1))

	// A reader of t keeps the switch from dropping t's NOTIFY triggers:
	// the log is on, and t notifies and appends both.
	pool := pgtest.Pool(t)
	blocker, err := pool.Begin(ctx)
	require.NoError(t, err)
	_, err = blocker.Exec(ctx, "SELECT count(*) FROM "+ident(schema, "t"))
	require.NoError(t, err)
	short, cancel := context.WithTimeout(ctx, time.Second)
	_, err = pgstore.Connect(short, pgtest.URL(t), pgstore.WithSchema(schema), pgstore.WithChangeLog(time.Hour))
	cancel()
	require.Error(t, err)
	require.NoError(t, blocker.Rollback(ctx))

	// The next connector that does not refuse the log, with WithChangeLog
	// or without, finishes the switch.
	reader := connectSchema(t, schema)
	require.Equal(t, logTriggers,
		tableTriggers(t, pool, schema, "t"))
	got := newEventLog()
	sub, err := reader.Subscribe(ctx, got.handle)
	require.NoError(t, err)
	defer sub.Close(context.Background())
	require.NoError(t, plain.Set(ctx, "t/b", 1, 2))
	waitForEvent(t, got, func(e pgstore.Event) bool { return e.Key == "t/b" && e.Cursor != "" })
}

func TestAChangeDuringTheSwitchReachesASubscriptionMadeMeanwhile(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	schema := pgtest.Schema(t)
	plain := connectSchema(t, schema, pgstore.WithoutChangeLog())
	for _, k := range []string{"a/1", "b/1", "c/1"} {
		require.NoError(t, plain.Set(ctx, k, 1, 1))
	}
	reader := connectSchema(t, schema) // follows the schema: no log yet
	admin := pgtest.Pool(t)
	blocker, err := admin.Begin(ctx)
	require.NoError(t, err)
	_, err = blocker.Exec(ctx, "SELECT count(*) FROM "+ident(schema, "b"))
	require.NoError(t, err)
	connected := make(chan error, 1)
	go func() {
		c, err := pgstore.Connect(ctx, pgtest.URL(t), pgstore.WithSchema(schema), pgstore.WithChangeLog(time.Hour))
		if err == nil {
			c.Close(context.Background())
		}
		connected <- err
	}()
	// The switch has given a the log's triggers and waits for b.
	waitUntil(t, ctx, "the switch waits for b", func() bool {
		var waiting int
		require.NoError(t, admin.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity
			WHERE wait_event_type = 'Lock' AND query LIKE '%TRIGGER%'||$1||'%'`, schema).Scan(&waiting))
		return waiting > 0
	})

	got := newEventLog()
	sub, err := reader.Subscribe(ctx, got.handle)
	require.NoError(t, err)
	defer sub.Close(context.Background())
	require.NoError(t, plain.Set(ctx, "c/1", 2, 2)) // c still has only its NOTIFY triggers
	waitForEvent(t, got, keyIs("c/1"))
	require.NoError(t, blocker.Rollback(ctx))
	require.NoError(t, <-connected)
	require.NoError(t, plain.Set(ctx, "a/1", 3, 3))
	waitForEvent(t, got, func(e pgstore.Event) bool { return e.Key == "a/1" && e.Cursor != "" })
}

func TestANotifySubscriptionThatMissedTheSwitchFindsTheLogWhenItReconnects(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	schema := pgtest.Schema(t)
	proxy, u := pgtest.NewProxy(t)
	node, err := pgstore.Connect(ctx, u, pgstore.WithSchema(schema), pgstore.WithLogger(testLogger(t)), pgstore.WithoutChangeLog())
	require.NoError(t, err)
	t.Cleanup(func() { proxy.Restore(); _ = node.Close(context.Background()) })
	require.NoError(t, node.Set(ctx, "t/a", 1, 1))
	got := newEventLog()
	sub, err := node.Subscribe(ctx, got.handle)
	require.NoError(t, err)
	defer sub.Close(context.Background())

	proxy.Cut() // the announcement of the log will not reach this node
	logged := connectSchema(t, schema, pgstore.WithChangeLog(time.Hour))
	proxy.Restore()
	waitForEvent(t, got, func(e pgstore.Event) bool { return e.Type == pgstore.Resync && e.Reason != nil })
	require.NoError(t, logged.Set(ctx, "t/b", 1, 2))
	waitForEvent(t, got, func(e pgstore.Event) bool { return e.Key == "t/b" && e.Cursor != "" })
}

func TestALogSubscriptionGoesOnWhenItsSchemaIsMadeAgain(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	schema := pgtest.Schema(t)
	c := connectSchema(t, schema, pgstore.WithChangeLog(time.Hour))
	require.NoError(t, c.Set(ctx, "t/a", 1, 1))
	got := newEventLog()
	sub, err := c.Subscribe(ctx, got.handle)
	require.NoError(t, err)
	defer sub.Close(context.Background())
	require.NoError(t, c.DestroySchema(ctx, schema))
	waitForEvent(t, got, func(e pgstore.Event) bool { return e.Type == pgstore.Resync })

	again := connectSchema(t, schema, pgstore.WithChangeLog(time.Hour))
	require.NoError(t, again.Set(ctx, "t/b", 1, 2))
	waitForEvent(t, got, keyIs("t/b"))
}

func TestRetentionWaitsForAReaderOfThePartitionInsteadOfHoldingUpWriters(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c, schema := connectNamed(t, pgstore.WithChangeLog(time.Hour))
	require.NoError(t, c.Set(ctx, "t/a", 1, 1))
	part := func() int64 { return queryInt(t, c, "SELECT part FROM "+ident(schema, "pgstore/log")) }
	reader, err := pgtest.Pool(t).Begin(ctx)
	require.NoError(t, err)
	defer reader.Rollback(ctx) //nolint:errcheck
	_, err = reader.Exec(ctx, "SELECT count(*) FROM "+ident(schema, "pgstore/log_entries"))
	require.NoError(t, err)

	require.NoError(t, c.RotateLog(ctx))
	require.EqualValues(t, 0, part(), "not while the partition is read: the next tick")
	require.NoError(t, c.Set(ctx, "t/b", 1, 2), "writers were not held behind it")
	require.NoError(t, reader.Rollback(ctx))
	require.NoError(t, c.RotateLog(ctx))
	require.EqualValues(t, 1, part())
}
