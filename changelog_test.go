package pgstore_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/pgstore/pgstore"
	"github.com/pgstore/pgstore/internal/pgtest"
)

// eventLog collects a subscription's events, and signals each arrival.
type eventLog struct {
	mu     sync.Mutex
	events []pgstore.Event
	more   chan struct{}
}

func newEventLog() *eventLog { return &eventLog{more: make(chan struct{}, 1)} }

func (l *eventLog) handle(e pgstore.Event) {
	l.mu.Lock()
	l.events = append(l.events, e)
	l.mu.Unlock()
	select {
	case l.more <- struct{}{}:
	default:
	}
}

// waitFor waits until n events have arrived, and returns them.
func (l *eventLog) waitFor(t *testing.T, n int) []pgstore.Event {
	t.Helper()
	ctx := testCtx(t)
	for {
		l.mu.Lock()
		got := append([]pgstore.Event(nil), l.events...)
		l.mu.Unlock()
		if len(got) >= n {
			return got
		}
		select {
		case <-l.more:
		case <-ctx.Done():
			t.Fatalf("%d of %d events arrived: %+v", len(got), n, got)
		}
	}
}

func TestTheChangeLogDeliversValuesCursorsAndOffsetsInCommitOrder(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c := connect(t, pgstore.WithChangeLog(time.Hour))
	got := newEventLog()
	sub, err := c.Subscribe(ctx, got.handle)
	require.NoError(t, err)
	defer sub.Close(context.Background())

	require.NoError(t, c.Set(ctx, "cars/bmw", 1, map[string]string{"model": "i3"}))
	require.NoError(t, c.Set(ctx, "cars/bmw", 2, map[string]string{"model": "i4"}))
	require.NoError(t, c.Delete(ctx, "cars/bmw"))
	events := got.waitFor(t, 4)
	require.Equal(t, pgstore.CreateTable, events[0].Type)
	require.Equal(t, "cars", events[0].Table)
	for i, want := range []struct {
		typ     pgstore.EventType
		version int64
		value   string
	}{{pgstore.Insert, 1, `{"model": "i3"}`}, {pgstore.Update, 2, `{"model": "i4"}`}, {pgstore.Delete, 2, ``}} {
		e := events[i+1]
		require.Equal(t, want.typ, e.Type, "event %d", i+1)
		require.Equal(t, "cars/bmw", e.Key)
		require.Equal(t, want.version, e.Version)
		if want.value == "" {
			require.Nil(t, e.Value)
		} else {
			require.JSONEq(t, want.value, string(e.Value))
		}
	}
	for i, e := range events {
		require.EqualValues(t, i+1, e.Offset, "offsets number a table's changes")
		require.NotEmpty(t, e.Cursor)
	}
}

func TestASubscriptionResumesExactlyAfterASavedCursor(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	schema := pgtest.Schema(t)
	c := connectSchema(t, schema, pgstore.WithChangeLog(time.Hour))
	first := newEventLog()
	sub, err := c.Subscribe(ctx, first.handle, pgstore.ForTables("k"))
	require.NoError(t, err)
	for i := range 10 {
		require.NoError(t, c.Set(ctx, fmt.Sprintf("k/%d", i), 1, i))
	}
	events := first.waitFor(t, 11) // CREATE_TABLE and ten inserts
	sub.Close(context.Background())
	saved := events[5].Cursor // as a process saves it before it stops

	// Another process, later: it resumes after the saved cursor.
	again := connectSchema(t, schema)
	resumed := newEventLog()
	sub, err = again.Subscribe(ctx, resumed.handle, pgstore.After(saved))
	require.NoError(t, err)
	defer sub.Close(context.Background())
	got := resumed.waitFor(t, 5)
	for i, e := range got {
		require.Equal(t, events[6+i].Cursor, e.Cursor)
		require.Equal(t, events[6+i].Key, e.Key)
	}
	require.NoError(t, c.Set(ctx, "k/later", 1, "later"))
	require.Equal(t, "k/later", resumed.waitFor(t, 6)[5].Key, "and goes on with what comes next")
}

func TestBadCursorsAreRefusedWithErrInvalidCursor(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c := connect(t, pgstore.WithChangeLog(time.Hour))
	other := connect(t, pgstore.WithChangeLog(time.Hour))
	require.NoError(t, other.Set(ctx, "k/x", 1, 1))
	_, otherCursor, err := other.List(ctx, "k", "", 1)
	require.NoError(t, err)
	_, mine, err := c.List(ctx, "k", "", 1)
	require.NoError(t, err)
	future := mine[:len(mine)-1] + "9"

	for name, cur := range map[string]string{"malformed": "not a cursor", "of another log": otherCursor, "beyond the end": future} {
		_, err := c.Subscribe(ctx, func(pgstore.Event) {}, pgstore.After(cur))
		require.ErrorIs(t, err, pgstore.ErrInvalidCursor, name)
	}
}

func TestAnExpiredCursorGetsOneResyncAndListThenCatchesUpExactly(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c := connect(t, pgstore.WithChangeLog(time.Hour))
	for i := range 5 {
		require.NoError(t, c.Set(ctx, fmt.Sprintf("k/%d", i), 1, i))
	}
	_, old, err := c.List(ctx, "k", "", 1)
	require.NoError(t, err)
	require.NoError(t, c.Set(ctx, "k/0", 2, "changed"))
	require.NoError(t, c.Delete(ctx, "k/1"))
	for range 4 { // every partition emptied once: the entries after old are gone
		require.NoError(t, c.RotateLog(ctx))
	}

	got := newEventLog()
	sub, err := c.Subscribe(ctx, got.handle, pgstore.After(old))
	require.NoError(t, err)
	defer sub.Close(context.Background())
	resync := got.waitFor(t, 1)[0]
	require.Equal(t, pgstore.Resync, resync.Type)
	require.ErrorIs(t, resync.Reason, pgstore.ErrCursorExpired)
	require.NotEmpty(t, resync.Cursor)

	// Re-read the state, then the changes after it.
	records, at, err := c.List(ctx, "k", "", 100)
	require.NoError(t, err)
	state := map[string]string{}
	for _, r := range records {
		state[r.Key] = string(r.Value)
	}
	require.NoError(t, c.Set(ctx, "k/2", 2, "after"))
	follow := newEventLog()
	sub2, err := c.Subscribe(ctx, follow.handle, pgstore.After(at))
	require.NoError(t, err)
	defer sub2.Close(context.Background())
	e := follow.waitFor(t, 1)[0]
	state[e.Key] = string(e.Value)
	require.Equal(t, map[string]string{"k/0": `"changed"`, "k/2": `"after"`, "k/3": `3`, "k/4": `4`}, state)
}

func TestCheckReportsTheLogAndASessionThatHoldsItsHead(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	schema := pgtest.Schema(t)
	c := connectSchema(t, schema, pgstore.WithChangeLog(time.Hour), pgstore.WithStuckAfter(0))
	require.NoError(t, c.Set(ctx, "k/x", 1, 1))
	logItem := func() pgstore.CheckResult {
		t.Helper()
		report, err := c.Check(ctx)
		require.NoError(t, err)
		return chkFind(t, report, "change log")
	}
	item := logItem()
	require.True(t, item.OK, item.Detail)
	require.Contains(t, item.Detail, "retention 1h0m0s; positions 1 to 2")

	// A session writes and then sits in its transaction: every write waits.
	conn, err := pgtest.Pool(t).Acquire(ctx)
	require.NoError(t, err)
	defer conn.Release()
	tx, err := conn.Begin(ctx)
	require.NoError(t, err)
	defer tx.Rollback(ctx) //nolint:errcheck
	_, err = tx.Exec(ctx, "UPDATE "+ident(schema, "k")+" SET version = 2")
	require.NoError(t, err)
	item = logItem()
	require.False(t, item.OK)
	require.Contains(t, item.Detail, "idle in a transaction")
	require.Contains(t, item.Fix, "pg_terminate_backend")
}
