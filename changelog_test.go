package pgstore_test

import (
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/pgstore/pgstore"
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
	defer sub.Close()

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
