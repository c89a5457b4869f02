package pgstore_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pgstore/pgstore"
	"github.com/pgstore/pgstore/internal/pgtest"
)

// The tests of this file are of the NOTIFY feed: their connectors keep their
// schema without a change log.

func connectFeed(t testing.TB, opts ...pgstore.Option) *pgstore.Connector {
	t.Helper()
	return connect(t, append([]pgstore.Option{pgstore.WithoutChangeLog()}, opts...)...)
}

func connectSchemaFeed(t testing.TB, schema string, opts ...pgstore.Option) *pgstore.Connector {
	t.Helper()
	return connectSchema(t, schema, append([]pgstore.Option{pgstore.WithoutChangeLog()}, opts...)...)
}

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
	t.Cleanup(func() { sub.Close(context.Background()) })
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

// noneBefore writes a marker record and checks that its INSERT is the next
// event: nothing else was pending. The marker's table must exist already.
func (f *feed) noneBefore(c *pgstore.Connector, markerKey string) {
	f.t.Helper()
	require.NoError(f.t, c.Set(context.Background(), markerKey, 1, "marker"))
	require.Equal(f.t, "INSERT "+markerKey+"@1", describe(f.next()))
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
	c := connectFeed(t)
	f := subscribe(t, c)

	require.NoError(t, c.Set(ctx, "cars/bmw", 1, map[string]any{"hp": 300}))
	f.expect("CREATE_TABLE cars", "INSERT cars/bmw@1")
	require.NoError(t, c.Set(ctx, "cars/bmw", 2, map[string]any{"hp": 310}))
	f.expect("UPDATE cars/bmw@2")
	require.NoError(t, c.Delete(ctx, "cars/bmw"))
	f.expect("DELETE cars/bmw@2")
	f.noneBefore(c, "cars/marker")
}

func TestFeedQuickSetsOfOneKeyGiveOneEvent(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	// A long interval and a batch of two: the batch goes out when its
	// second key arrives, so the five sets of "a" coalesce for sure.
	c := connectFeed(t, pgstore.WithWriteInterval(time.Hour), pgstore.WithMaxBatchSize(2))
	f := subscribe(t, c)
	var results []*pgstore.Result
	for v := int64(1); v <= 5; v++ {
		results = append(results, c.SetAsync(ctx, "t/a", v, v))
	}
	results = append(results, c.SetAsync(ctx, "t/b", 1, 1))
	for _, r := range results {
		require.NoError(t, r.Wait(ctx))
	}
	f.expect("CREATE_TABLE t")
	got := []string{describe(f.next()), describe(f.next())}
	require.ElementsMatch(t, []string{"INSERT t/a@5", "INSERT t/b@1"}, got)
}

func TestFeedWritesToTwoTablesInOneBatch(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	c := connectFeed(t, pgstore.WithWriteInterval(time.Hour), pgstore.WithMaxBatchSize(4))
	f := subscribe(t, c)
	rs := []*pgstore.Result{
		c.SetAsync(ctx, "x/1", 1, "x1"), c.SetAsync(ctx, "y/1", 1, "y1"),
		c.SetAsync(ctx, "x/2", 1, "x2"), c.SetAsync(ctx, "y/2", 1, "y2"),
	}
	for _, r := range rs {
		require.NoError(t, r.Wait(ctx))
	}
	var got []string
	for range 6 {
		got = append(got, describe(f.next()))
	}
	require.ElementsMatch(t, []string{"CREATE_TABLE x", "CREATE_TABLE y", "INSERT x/1@1", "INSERT x/2@1", "INSERT y/1@1", "INSERT y/2@1"}, got)
	// Each table's events come after its CREATE_TABLE.
	require.Less(t, slices.Index(got, "CREATE_TABLE x"), slices.Index(got, "INSERT x/1@1"))
	require.Less(t, slices.Index(got, "CREATE_TABLE y"), slices.Index(got, "INSERT y/2@1"))
}

func TestFeedIDsThatWouldBreakAColonSeparatedPayload(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	c := connectFeed(t)
	require.NoError(t, c.Set(ctx, "odd/warmup", 1, 1))
	f := subscribe(t, c)
	ids := []string{
		"a:b:c", "it's", `say "hi"`, "ключ:значение", "🚗:🚙", "a/b:c",
		strings.Repeat("x:", 1000),                 // 2,000 bytes
		strings.Repeat("\x01", pgstore.MaxIDBytes), // escapes to 6x: sent in base64
		strings.Repeat("é", pgstore.MaxIDBytes/2),  // multi-byte, at the limit
		strings.Repeat(`"`, pgstore.MaxIDBytes),    // escapes to 2x
	}
	for i, id := range ids {
		require.NoError(t, c.Set(ctx, "odd/"+id, int64(i+1), i), "id %d", i)
		e := f.next()
		require.Equal(t, pgstore.Insert, e.Type)
		require.Equal(t, "odd", e.Table)
		require.Equal(t, id, e.ID, "id %d", i)
		require.Equal(t, "odd/"+id, e.Key)
		require.Equal(t, int64(i+1), e.Version)
	}
	f.noneBefore(c, "odd/marker")
}

func TestFeedLargeFlushCoversEveryKey(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	const n = 10000
	c := connectFeed(t, pgstore.WithWriteInterval(time.Hour), pgstore.WithMaxBatchSize(n))
	f := subscribe(t, c)
	results := make([]*pgstore.Result, n)
	for i := range n {
		results[i] = c.SetAsync(ctx, fmt.Sprintf("big/%d", i), 1, map[string]int{"i": i})
	}
	for _, r := range results {
		require.NoError(t, r.Wait(ctx))
	}
	f.expect("CREATE_TABLE big")
	seen := make(map[string]bool, n)
	for len(seen) < n {
		e := f.next()
		require.Equal(t, pgstore.Insert, e.Type)
		require.False(t, seen[e.Key], "duplicate event for %s", e.Key)
		seen[e.Key] = true
	}
	for i := range n {
		require.True(t, seen[fmt.Sprintf("big/%d", i)])
	}
}

func TestFeedTwoConnectorsSeeEachOthersWrites(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	schema := pgtest.Schema(t)
	a, b := connectSchemaFeed(t, schema), connectSchemaFeed(t, schema)
	fa, fb := subscribe(t, a), subscribe(t, b)
	require.NoError(t, a.Set(ctx, "shared/from-a", 1, "a"))
	fb.expect("CREATE_TABLE shared", "INSERT shared/from-a@1")
	fa.expect("CREATE_TABLE shared", "INSERT shared/from-a@1")
	require.NoError(t, b.Set(ctx, "shared/from-b", 1, "b"))
	fa.expect("INSERT shared/from-b@1")
	fb.expect("INSERT shared/from-b@1")
}

func TestFeedTableCreatedOnceWhenTwoConnectorsRace(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	schema := pgtest.Schema(t)
	a, b := connectSchemaFeed(t, schema), connectSchemaFeed(t, schema)
	f := subscribe(t, a)
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i, c := range []*pgstore.Connector{a, b} {
		wg.Go(func() {
			<-start
			assert.NoError(t, c.Set(ctx, fmt.Sprintf("race/%d", i), 1, i)) // not require: another goroutine

		})
	}
	close(start)
	wg.Wait()
	got := []string{describe(f.next()), describe(f.next()), describe(f.next())}
	require.ElementsMatch(t, []string{"CREATE_TABLE race", "INSERT race/0@1", "INSERT race/1@1"}, got)
	require.Equal(t, "CREATE_TABLE race", got[0])
	f.noneBefore(a, "race/marker")
}

func TestFeedFilters(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	c := connectFeed(t)
	all := subscribe(t, c)
	updates := subscribe(t, c, pgstore.ForEvents(pgstore.Update))
	cars := subscribe(t, c, pgstore.ForTables("cars"))
	tables := subscribe(t, c, pgstore.ForEvents(pgstore.CreateTable, pgstore.DestroyTable), pgstore.ForTables("bikes"))

	require.NoError(t, c.Set(ctx, "cars/a", 1, 1))
	require.NoError(t, c.Set(ctx, "bikes/a", 1, 1))
	require.NoError(t, c.Set(ctx, "bikes/a", 2, 2))
	require.NoError(t, c.Set(ctx, "cars/a", 2, 2))
	require.NoError(t, c.DropTable(ctx, "bikes"))

	all.expect("CREATE_TABLE cars", "INSERT cars/a@1", "CREATE_TABLE bikes", "INSERT bikes/a@1",
		"UPDATE bikes/a@2", "UPDATE cars/a@2", "DESTROY_TABLE bikes")
	updates.expect("UPDATE bikes/a@2", "UPDATE cars/a@2")
	cars.expect("CREATE_TABLE cars", "INSERT cars/a@1", "UPDATE cars/a@2")
	tables.expect("CREATE_TABLE bikes", "DESTROY_TABLE bikes")

	// Nothing more is pending for any of them.
	require.NoError(t, c.Set(ctx, "cars/end", 1, 1))
	all.expect("INSERT cars/end@1")
	cars.expect("INSERT cars/end@1")
	require.NoError(t, c.Set(ctx, "cars/end", 2, 1))
	updates.expect("UPDATE cars/end@2")
	require.NoError(t, c.Set(ctx, "bikes/again", 1, 1))
	tables.expect("CREATE_TABLE bikes")
}

func TestFeedSwitchedOffEventsInstallNoTrigger(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	schema := pgtest.Schema(t)
	triggers := func(c *pgstore.Connector) []string {
		rows, err := c.Query(ctx, `SELECT tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
			JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = 'cars' ORDER BY 1`, schema)
		require.NoError(t, err)
		names, err := pgx.CollectRows(rows, pgx.RowTo[string])
		require.NoError(t, err)
		return names
	}

	inserts := connectSchemaFeed(t, schema, pgstore.WithEvents(pgstore.Insert))
	f := subscribe(t, inserts)
	require.NoError(t, inserts.Set(ctx, "cars/a", 1, 1))
	require.NoError(t, inserts.Set(ctx, "cars/a", 2, 2))
	require.NoError(t, inserts.Delete(ctx, "cars/a"))
	require.NoError(t, inserts.Set(ctx, "cars/b", 1, 1))
	f.expect("INSERT cars/a@1", "INSERT cars/b@1") // no CREATE_TABLE, UPDATE or DELETE
	require.Equal(t, []string{"pgstore_insert"}, triggers(inserts))

	// A later Connect with other events brings the existing table in line.
	connectSchemaFeed(t, schema, pgstore.WithEvents(pgstore.Update, pgstore.Delete))
	require.Equal(t, []string{"pgstore_delete", "pgstore_update"}, triggers(inserts))
	connectSchemaFeed(t, schema) // without WithEvents, existing triggers stay
	require.Equal(t, []string{"pgstore_delete", "pgstore_update"}, triggers(inserts))
	connectSchemaFeed(t, schema, pgstore.WithEvents(pgstore.CreateTable, pgstore.DestroyTable, pgstore.Insert, pgstore.Update, pgstore.Delete))
	require.Equal(t, []string{"pgstore_delete", "pgstore_insert", "pgstore_update"}, triggers(inserts))

	off := connectSchemaFeed(t, schema, pgstore.WithEvents())
	require.Empty(t, triggers(off))
}

func TestFeedMixedCaseSchema(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	schema := "Mixed Case " + pgtest.Schema(t) // dropped below, as the helper's lower-case name is not this one
	t.Cleanup(func() { pgtest.DropSchema(t, pgtest.URL(t), schema) })
	c := connectSchemaFeed(t, schema)
	f := subscribe(t, c)
	require.NoError(t, c.Set(ctx, "cars/a", 1, 1))
	e := f.next()
	require.Equal(t, schema, e.Schema)
	f.expect("INSERT cars/a@1")
}

func TestFeedOfAnotherSchema(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	mine, theirs := pgtest.Schema(t), pgtest.Schema(t)
	c := connectSchemaFeed(t, mine)
	other := connectSchemaFeed(t, theirs)
	f := subscribe(t, c, pgstore.ForSchema(theirs))
	own := subscribe(t, c)
	require.NoError(t, other.Set(ctx, "cars/a", 1, 1))
	e := f.next()
	require.Equal(t, theirs, e.Schema)
	require.Equal(t, "CREATE_TABLE cars", describe(e))
	f.expect("INSERT cars/a@1")
	require.NoError(t, c.Set(ctx, "mine/a", 1, 1))
	e = own.next()
	require.Equal(t, mine, e.Schema, "the connector's own feed gets only its schema")
}

func TestFeedDestroySchemaAnnouncesEachTable(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	c := connectFeed(t)
	other := pgtest.Schema(t)
	writer := connectSchemaFeed(t, other)
	require.NoError(t, writer.Set(ctx, "a/1", 1, 1))
	require.NoError(t, writer.Set(ctx, "b/1", 1, 1))
	f := subscribe(t, c, pgstore.ForSchema(other))
	require.NoError(t, c.DestroySchema(ctx, other))
	require.ElementsMatch(t, []string{"DESTROY_TABLE a", "DESTROY_TABLE b"}, []string{describe(f.next()), describe(f.next())})
}

func TestFeedSubscribeRefusesBadInput(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	c := connectFeed(t)
	_, err := c.Subscribe(ctx, nil)
	require.ErrorContains(t, err, "handler is nil")
	_, err = c.Subscribe(ctx, func(pgstore.Event) {}, pgstore.ForEvents(pgstore.EventType(42)))
	require.ErrorContains(t, err, "unknown event type")
	_, err = c.Subscribe(ctx, func(pgstore.Event) {}, pgstore.ForTables(""))
	require.ErrorContains(t, err, "table name is empty")
	_, err = c.Subscribe(ctx, func(pgstore.Event) {}, pgstore.ForSchema(strings.Repeat("s", 64)))
	require.ErrorContains(t, err, "over PostgreSQL's limit of 63")
	_, err = pgstore.Connect(ctx, pgtest.URL(t), pgstore.WithEvents(pgstore.Resync))
	require.ErrorContains(t, err, "WithEvents")
}

// listenerPIDs returns the backends that LISTEN on a schema's channel.
func listenerPIDs(t *testing.T, schema string) []int32 {
	t.Helper()
	rows, err := pgtest.Pool(t).Query(context.Background(),
		"SELECT pid FROM pg_stat_activity WHERE query = $1", "LISTEN "+pgx.Identifier{schema}.Sanitize())
	require.NoError(t, err)
	pids, err := pgx.CollectRows(rows, pgx.RowTo[int32])
	require.NoError(t, err)
	return pids
}

func TestFeedOneListenConnectionForManySubscriptions(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	schema := pgtest.Schema(t)
	c := connectSchemaFeed(t, schema)
	var got sync.WaitGroup
	const n = 1000
	got.Add(n)
	for range n {
		var once sync.Once
		sub, err := c.Subscribe(ctx, func(e pgstore.Event) {
			if e.Type == pgstore.Insert {
				once.Do(got.Done)
			}
		})
		require.NoError(t, err)
		t.Cleanup(func() { sub.Close(context.Background()) })
	}
	require.Len(t, listenerPIDs(t, schema), 1)
	require.NoError(t, c.Set(ctx, "t/a", 1, 1))
	got.Wait() // every subscription got the insert
}

func TestFeedResyncAfterListenerBackendIsKilled(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	schema := pgtest.Schema(t)
	c := connectSchemaFeed(t, schema)
	f := subscribe(t, c)
	require.NoError(t, c.Set(ctx, "t/before", 1, 1))
	f.expect("CREATE_TABLE t", "INSERT t/before@1")

	// Writes go on while the listener is killed.
	stop := make(chan struct{})
	var writes sync.WaitGroup
	writes.Go(func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			require.NoError(t, c.Set(ctx, fmt.Sprintf("t/during-%d", i), 1, i))
		}
	})
	pids := listenerPIDs(t, schema)
	require.Len(t, pids, 1)
	_, err := pgtest.Pool(t).Exec(ctx, "SELECT pg_terminate_backend($1)", pids[0])
	require.NoError(t, err)
	for e := f.next(); e.Type != pgstore.Resync; e = f.next() {
		require.Equal(t, pgstore.Insert, e.Type) // events until the loss
	}
	close(stop)
	writes.Wait()
	// After the Resync, events flow again, from a new backend.
	require.NoError(t, c.Set(ctx, "t/after", 1, 1))
	for e := f.next(); e.Key != "t/after"; e = f.next() {
		require.Equal(t, pgstore.Insert, e.Type)
	}
	require.NotEqual(t, pids, listenerPIDs(t, schema))
}

func TestFeedSurvivesServerOutage(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	proxy, url := pgtest.NewProxy(t)
	schema := pgtest.Schema(t)
	c, err := pgstore.Connect(ctx, url, pgstore.WithSchema(schema), pgstore.WithRetryTimeout(time.Minute), pgstore.WithoutChangeLog())
	require.NoError(t, err)
	f := subscribe(t, c)
	require.NoError(t, c.Set(ctx, "t/before", 1, 1))
	f.expect("CREATE_TABLE t", "INSERT t/before@1")

	proxy.Cut()
	// A write during the outage waits, retrying, for the server.
	during := c.SetAsync(ctx, "t/during", 1, 1)
	proxy.Restore()
	require.NoError(t, during.Wait(ctx))
	e := f.next()
	if e.Type == pgstore.Insert { // the listener may be back before the write
		require.Equal(t, "t/during", e.Key)
		e = f.next()
	}
	require.Equal(t, pgstore.Resync, e.Type)
	require.NoError(t, c.Set(ctx, "t/after", 1, 1))
	for e := f.next(); e.Key != "t/after"; e = f.next() {
		require.Equal(t, "t/during", e.Key)
	}

	// Close returns promptly while the server is away.
	proxy.Cut()
	closeCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	require.NoError(t, c.Close(closeCtx))
}

func TestFeedSlowSubscriberGetsResyncInsteadOfAGap(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	c := connectFeed(t)
	release := make(chan struct{})
	var blocked sync.Once
	events := make(chan pgstore.Event, 100000)
	sub, err := c.Subscribe(ctx, func(e pgstore.Event) {
		blocked.Do(func() { <-release })
		events <- e
	}, pgstore.ForEvents(pgstore.Insert))
	require.NoError(t, err)
	t.Cleanup(func() { sub.Close(context.Background()) })
	fast := subscribe(t, c, pgstore.ForEvents(pgstore.Insert))

	// Long ids make many notifications: more than the slow queue holds.
	long := strings.Repeat("x", 2000)
	const n = 4000
	rs := make([]*pgstore.Result, n)
	for i := range n {
		rs[i] = c.SetAsync(ctx, fmt.Sprintf("t/%d-%s", i, long), 1, i)
	}
	for _, r := range rs {
		require.NoError(t, r.Wait(ctx))
	}
	for range n { // the fast subscriber misses nothing
		require.Equal(t, pgstore.Insert, fast.next().Type)
	}
	close(release)
	resync := false
	count := 0
	for !resync {
		select {
		case e := <-events:
			if e.Type == pgstore.Resync {
				resync = true
			} else {
				count++
			}
		case <-time.After(15 * time.Second):
			t.Fatal("no Resync")
		}
	}
	require.Less(t, count, n, "some events were dropped for the Resync")
	require.NoError(t, c.Set(ctx, "t/after", 1, 1))
	for {
		e := <-events
		require.NotEqual(t, pgstore.Resync, e.Type)
		if e.Key == "t/after" {
			break
		}
	}
}

func TestFeedHandlerPanicIsRecovered(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	var logs syncBuffer
	c := connectFeed(t, pgstore.WithLogger(slog.New(slog.NewTextHandler(&logs, nil))))
	events := make(chan pgstore.Event, 10)
	sub, err := c.Subscribe(ctx, func(e pgstore.Event) {
		if e.Key == "t/boom" {
			panic("handler bug")
		}
		events <- e
	}, pgstore.ForEvents(pgstore.Insert))
	require.NoError(t, err)
	t.Cleanup(func() { sub.Close(context.Background()) })
	require.NoError(t, c.Set(ctx, "t/boom", 1, 1))
	require.NoError(t, c.Set(ctx, "t/fine", 1, 1))
	require.Equal(t, "t/fine", (<-events).Key)
	require.Contains(t, logs.String(), "handler bug")
}

func TestFeedNoHandlerCallAfterClose(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	c := connectFeed(t)
	var closed atomic.Bool
	var late atomic.Int32
	sub, err := c.Subscribe(ctx, func(pgstore.Event) {
		if closed.Load() {
			late.Add(1)
		}
	})
	require.NoError(t, err)
	witness := subscribe(t, c, pgstore.ForEvents(pgstore.Insert))
	for i := range 50 {
		c.SetAsync(ctx, fmt.Sprintf("t/%d", i), 1, i)
	}
	sub.Close(context.Background())
	closed.Store(true)
	require.NoError(t, c.Set(ctx, "t/last", 1, 1))
	for e := witness.next(); e.Key != "t/last"; e = witness.next() {
	}
	require.Zero(t, late.Load())
	sub.Close(context.Background()) // twice is fine

	// Close from inside the handler returns, and ends the calls.
	var calls atomic.Int32
	var self *pgstore.Subscription
	ready := make(chan struct{})
	self, err = c.Subscribe(ctx, func(pgstore.Event) {
		<-ready
		calls.Add(1)
		self.Close(context.Background())
	}, pgstore.ForEvents(pgstore.Insert))
	require.NoError(t, err)
	close(ready)
	require.NoError(t, c.Set(ctx, "t/x", 1, 1))
	require.NoError(t, c.Set(ctx, "t/y", 1, 1))
	for e := witness.next(); e.Key != "t/y"; e = witness.next() {
	}
	self.Close(context.Background())
	require.Equal(t, int32(1), calls.Load())
}

// syncBuffer is a bytes.Buffer safe for a logger and a test to share.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func TestFeedResyncComesOnlyOnceListeningAgain(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	c, schema := connectNamed(t, pgstore.WithoutChangeLog())
	require.NoError(t, c.Set(ctx, "t/a", 1, 1))

	// On Resync, the subscriber re-reads; a write made right then must
	// reach it, so the LISTEN must be in place before the Resync (which
	// internal/listener's TestReconnectedComesOnlyOnceListeningAgain shows
	// of the Reconnected call behind it).
	events := make(chan pgstore.Event, 16)
	sub, err := c.Subscribe(ctx, func(e pgstore.Event) {
		if e.Type == pgstore.Resync {
			require.NoError(t, c.Set(ctx, "t/written-on-resync", 1, 1))
		}
		events <- e
	})
	require.NoError(t, err)
	t.Cleanup(func() { sub.Close(context.Background()) })

	pids := listenerPIDs(t, schema)
	require.Len(t, pids, 1)
	_, err = pgtest.Pool(t).Exec(ctx, "SELECT pg_terminate_backend($1)", pids[0])
	require.NoError(t, err)
	for {
		select {
		case e := <-events:
			if e.Key == "t/written-on-resync" {
				return
			}
		case <-time.After(15 * time.Second):
			t.Fatal("the write made on Resync was never delivered")
		}
	}
}

// subscribeStuck subscribes a handler whose first call (the CREATE_TABLE of
// the writes that follow) blocks until release is closed, writes t/a and t/b,
// and returns once that call has begun. calls counts the handler's calls.
func subscribeStuck(t *testing.T, ctx context.Context, c *pgstore.Connector) (sub *pgstore.Subscription, release chan struct{}, calls *atomic.Int32) {
	t.Helper()
	stuck, release, calls := make(chan struct{}), make(chan struct{}), new(atomic.Int32)
	sub, err := c.Subscribe(ctx, func(pgstore.Event) {
		if calls.Add(1) == 1 {
			close(stuck)
			<-release
		}
	})
	require.NoError(t, err)
	require.NoError(t, c.Set(ctx, "t/a", 1, 1))
	require.NoError(t, c.Set(ctx, "t/b", 1, 1))
	<-stuck
	return sub, release, calls
}

func TestCloseDoesNotWaitPastItsContextForAStuckHandler(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	c, err := pgstore.Connect(ctx, pgtest.URL(t), pgstore.WithSchema(pgtest.Schema(t)))
	require.NoError(t, err)
	_, release, _ := subscribeStuck(t, ctx, c)

	closeCtx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel()
	err = c.Close(closeCtx)
	require.ErrorIs(t, err, context.DeadlineExceeded)
	require.ErrorContains(t, err, "handler is still running")
	close(release) // the handler returns; its goroutine ends (goleak checks)
}

func TestSubscriptionCloseDoesNotWaitPastItsContextForAStuckHandler(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	sub, release, calls := subscribeStuck(t, ctx, connectFeed(t))

	closeCtx, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	err := sub.Close(closeCtx)
	require.ErrorIs(t, err, context.DeadlineExceeded)
	require.ErrorContains(t, err, "the handler has not returned")
	close(release)
	require.NoError(t, sub.Close(ctx), "once the handler returned")
	require.Equal(t, int32(1), calls.Load(), "the call in progress was the last")
}

// Statement-level triggers: a flush of 5,000 rows sends a few notifications
// (one per chunk of under 8000 bytes), not one per row.
func TestFeedAFlushOfManyRowsSendsFewNotifications(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	const n = 5000
	schema := pgtest.Schema(t)
	c := connectSchemaFeed(t, schema, pgstore.WithWriteInterval(time.Hour), pgstore.WithMaxBatchSize(n))
	listener, err := pgx.Connect(ctx, pgtest.URL(t))
	require.NoError(t, err)
	t.Cleanup(func() { listener.Close(ctx) })
	_, err = listener.Exec(ctx, "LISTEN "+pgx.Identifier{schema}.Sanitize())
	require.NoError(t, err)

	results := make([]*pgstore.Result, n)
	for i := range n {
		results[i] = c.SetAsync(ctx, fmt.Sprintf("many/%d", i), 1, i) // the n-th fills the batch: it flushes
	}
	for _, r := range results {
		require.NoError(t, r.Wait(ctx))
	}
	_, err = listener.Exec(ctx, "SELECT pg_notify($1, 'end')", schema) // after the flush's, in commit order
	require.NoError(t, err)

	rows, notifications := 0, 0
	for {
		waitCtx, cancel := context.WithTimeout(ctx, 15*time.Second)
		note, err := listener.WaitForNotification(waitCtx)
		cancel()
		require.NoError(t, err)
		if note.Payload == "end" {
			break
		}
		var p struct {
			Op   string            `json:"op"`
			Rows []json.RawMessage `json:"rows"`
		}
		require.NoError(t, json.Unmarshal([]byte(note.Payload), &p))
		require.Less(t, len(note.Payload), 8000)
		if p.Op == "insert" {
			notifications++
			rows += len(p.Rows)
		}
	}
	require.Equal(t, n, rows)
	require.Less(t, notifications, n/50, "rows are grouped, not sent one by one")
	t.Logf("%d rows in %d notifications", rows, notifications)
}

func TestAPoolWithItsOwnNotificationHandlerStillFeedsSubscriptions(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	cfg, err := pgxpool.ParseConfig(pgtest.URL(t))
	require.NoError(t, err)
	cfg.ConnConfig.OnNotification = func(*pgconn.PgConn, *pgconn.Notification) {} // the caller's own
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	c := newOnPool(t, pool)

	got := newEventLog()
	sub, err := c.Subscribe(ctx, got.handle)
	require.NoError(t, err)
	defer sub.Close(context.Background())
	require.NoError(t, c.Set(ctx, "own/k", 1, 1))
	events := got.waitFor(t, 2)
	require.Equal(t, pgstore.Insert, events[1].Type)
	require.Equal(t, "own/k", events[1].Key)
	report, err := c.Check(ctx)
	require.NoError(t, err)
	item := chkFind(t, report, "LISTEN/NOTIFY")
	require.True(t, item.OK, "Check's round trip works on such a pool too: %s", item.Detail)
}

func TestFiltersThatCouldNeverMatchAreRefused(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c := connectFeed(t)
	for _, tc := range []struct {
		name   string
		filter pgstore.Filter
		want   string
	}{
		{"a nil filter", nil, "filter 1 of 1 is nil"},
		{"ForTables with no table", pgstore.ForTables(), "ForTables: no table named"},
		{"ForTables with a table no key can name", pgstore.ForTables("a/b"), `table name "a/b" holds a /`},
		{"ForEvents with no type", pgstore.ForEvents(), "ForEvents: no event type named"},
	} {
		sub, err := c.Subscribe(ctx, func(pgstore.Event) {}, tc.filter)
		require.ErrorContains(t, err, tc.want, tc.name)
		require.Nil(t, sub, tc.name)
	}
}

func TestConnectorsWithoutWithEventsFollowTheEventsTheSchemaRecords(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	schema := pgtest.Schema(t)
	connectSchemaFeed(t, schema, pgstore.WithEvents(pgstore.Insert)) // records the schema's events
	plain := connectSchemaFeed(t, schema)
	require.NoError(t, plain.Set(ctx, "cars/bmw", 1, "bmw")) // a new table, by a connector without the option
	require.Equal(t, []string{"pgstore_insert"}, tableTriggers(t, pgtest.Pool(t), schema, "cars"))
}
