package pgstore_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/pgstore/pgstore"
	"github.com/pgstore/pgstore/internal/pgtest"
)

// feed collects the events of a subscription.
type feed struct {
	t      testing.TB
	events chan pgstore.Event
	sub    *pgstore.Subscription
}

func subscribe(t testing.TB, c *pgstore.Connector, filters ...pgstore.Filter) *feed {
	t.Helper()
	f := &feed{t: t, events: make(chan pgstore.Event, 100000)}
	sub, err := c.Subscribe(context.Background(), func(e pgstore.Event) { f.events <- e }, filters...)
	require.NoError(t, err)
	f.sub = sub
	t.Cleanup(sub.Close)
	return f
}

// next returns the next event, failing the test if none comes in a while
// (a bound for a hung feed, not a measure of speed).
func (f *feed) next() pgstore.Event {
	f.t.Helper()
	select {
	case e := <-f.events:
		return e
	case <-time.After(15 * time.Second):
		f.t.Fatal("no event")
		return pgstore.Event{}
	}
}

// expect checks the next events against "TYPE key@version" lines, or "TYPE
// table" for table events.
func (f *feed) expect(want ...string) {
	f.t.Helper()
	for _, w := range want {
		require.Equal(f.t, w, describe(f.next()))
	}
}

// none checks that no event is waiting once a marker written after
// everything else has arrived.
func (f *feed) noneBefore(c *pgstore.Connector, markerKey string) {
	f.t.Helper()
	require.NoError(f.t, c.Set(context.Background(), markerKey, 1, "marker"))
	for {
		e := f.next()
		if e.Key == markerKey || (e.Type == pgstore.CreateTable && e.Table == strings.Split(markerKey, "/")[0]) {
			if e.Key == markerKey {
				return
			}
			continue
		}
		f.t.Fatalf("unexpected event %s", describe(e))
	}
}

func describe(e pgstore.Event) string {
	switch e.Type {
	case pgstore.CreateTable, pgstore.DestroyTable:
		return e.Type.String() + " " + e.Table
	case pgstore.Resync:
		return "RESYNC"
	}
	return fmt.Sprintf("%s %s@%d", e.Type, e.Key, e.Version)
}

func TestFeedDeepstreamSequence(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	c := connect(t)
	f := subscribe(t, c)

	require.NoError(t, c.Set(ctx, "cars/bmw", 1, map[string]any{"hp": 300}))
	f.expect("CREATE_TABLE cars", "INSERT cars/bmw@1")
	require.NoError(t, c.Set(ctx, "cars/bmw", 2, map[string]any{"hp": 310}))
	f.expect("UPDATE cars/bmw@2")
	require.NoError(t, c.Delete(ctx, "cars/bmw"))
	f.expect("DELETE cars/bmw@2")
	f.noneBefore(c, "cars/marker")
	_ = sync.Mutex{}
	_ = pgtest.EnvURL
}
