package pgstore_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"reflect"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/pgstore/pgstore"
	"github.com/pgstore/pgstore/internal/pgtest"
)

// Fault tests of the change log: writers that commit out of order, many
// writers at once, killed LISTEN connections, a slow handler, large values,
// rotations from two connectors, table events and filters; and two faults
// found on the way. Each test has a schema of its own and waits on what the
// database or the subscription tells it, never on a sleep; the sleeps here
// make a slow handler or hold a lock, and bound nothing.

// faultEvent is what these tests keep of an event: no value, so that tens of
// thousands of them cost little.
type faultEvent struct {
	typ     pgstore.EventType
	table   string
	key     string
	version int64
	cursor  string
	pos     int64 // the cursor's position; -1 if it holds none
	offset  int64
	reason  error
}

func (e faultEvent) String() string {
	return fmt.Sprintf("%d:%s %s %s@%d off %d", e.pos, e.typ, e.table, e.key, e.version, e.offset)
}

// faultRecorder records a subscription's events and signals each arrival.
type faultRecorder struct {
	// delay makes a slow handler: each event takes delay on average, paced
	// against the clock so that sleeps that overrun do not add up. Set it
	// before Subscribe.
	delay time.Duration
	next  time.Time // when the next event's time is up; the handler's own

	mu      sync.Mutex
	events  []faultEvent
	resyncs int
	more    chan struct{}
}

func newFaultRecorder() *faultRecorder { return &faultRecorder{more: make(chan struct{}, 1)} }

func (r *faultRecorder) handle(e pgstore.Event) {
	if r.delay > 0 {
		now := time.Now()
		if credit := now.Add(-50 * r.delay); r.next.Before(credit) {
			r.next = credit // idle meanwhile: no burst of fast events after
		}
		r.next = r.next.Add(r.delay)
		if d := r.next.Sub(now); d > 0 {
			time.Sleep(d)
		}
	}
	fe := faultEvent{typ: e.Type, table: e.Table, key: e.Key, version: e.Version, cursor: e.Cursor,
		pos: cursorPosition(e.Cursor), offset: e.Offset, reason: e.Reason}
	r.mu.Lock()
	r.events = append(r.events, fe)
	if e.Type == pgstore.Resync {
		r.resyncs++
	}
	r.mu.Unlock()
	select {
	case r.more <- struct{}{}:
	default:
	}
}

func (r *faultRecorder) count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.events)
}

func (r *faultRecorder) snapshot() []faultEvent {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.events)
}

// waitFor waits until n events have arrived, and returns them all.
func (r *faultRecorder) waitFor(t *testing.T, ctx context.Context, n int) []faultEvent {
	t.Helper()
	for {
		if r.count() >= n {
			return r.snapshot()
		}
		select {
		case <-r.more:
		case <-ctx.Done():
			got := r.snapshot()
			tail := got[max(0, len(got)-5):]
			t.Fatalf("%d of %d events arrived; the last: %v", len(got), n, tail)
		}
	}
}

// waitForPosition waits until an event at or past the log position pos has
// arrived, and returns every event.
func (r *faultRecorder) waitForPosition(t *testing.T, ctx context.Context, pos int64) []faultEvent {
	t.Helper()
	for {
		r.mu.Lock()
		reached := len(r.events) > 0 && r.events[len(r.events)-1].pos >= pos
		r.mu.Unlock()
		if reached {
			return r.snapshot()
		}
		select {
		case <-r.more:
		case <-ctx.Done():
			got := r.snapshot()
			t.Fatalf("position %d never arrived; %d events did, the last: %v", pos, len(got), got[max(0, len(got)-5):])
		}
	}
}

// cursorPosition returns the position of a cursor "<log id>.<position>", or
// -1 for a cursor without one.
func cursorPosition(c string) int64 {
	_, p, ok := strings.Cut(c, ".")
	if !ok {
		return -1
	}
	n, err := strconv.ParseInt(p, 10, 64)
	if err != nil {
		return -1
	}
	return n
}

// faultEntry is a row of the log, read straight from its table.
type faultEntry struct {
	pos, off  int64
	table, id string
	op        string
	version   int64
}

var faultOps = map[string]pgstore.EventType{"C": pgstore.CreateTable, "X": pgstore.DestroyTable,
	"I": pgstore.Insert, "U": pgstore.Update, "D": pgstore.Delete}

// matches reports whether a delivered event is this entry.
func (le faultEntry) matches(e faultEvent) bool {
	key := ""
	if le.id != "" {
		key = le.table + "/" + le.id
	}
	return e.pos == le.pos && e.typ == faultOps[le.op] && e.table == le.table && e.key == key &&
		e.version == le.version && e.offset == le.off
}

func (le faultEntry) String() string {
	return fmt.Sprintf("%d:%s %s/%s@%d off %d", le.pos, faultOps[le.op], le.table, le.id, le.version, le.off)
}

// logEntries reads the whole log of a schema, in position order.
func logEntries(t *testing.T, pool *pgxpool.Pool, schema string) []faultEntry {
	t.Helper()
	rows, err := pool.Query(testCtx(t), "SELECT position, off, tbl, coalesce(id, ''), op::text, coalesce(version, 0) FROM "+
		ident(schema, "pgstore/log_entries")+" ORDER BY position")
	require.NoError(t, err)
	entries, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (faultEntry, error) {
		var e faultEntry
		err := row.Scan(&e.pos, &e.off, &e.table, &e.id, &e.op, &e.version)
		return e, err
	})
	require.NoError(t, err)
	return entries
}

// logHead reads the committed head of a schema's log: where it ends (the
// head's floor, or its last entry), what the janitor dropped, and which
// partition takes the appends.
type faultHead struct {
	position, dropped int64
	part              int
}

func logHead(t *testing.T, q interface {
	QueryRow(context.Context, string, ...any) pgx.Row
}, schema string) faultHead {
	t.Helper()
	var h faultHead
	require.NoError(t, q.QueryRow(testCtx(t), "SELECT position, dropped, part FROM "+ident(schema, "pgstore/log")).Scan(&h.position, &h.dropped, &h.part))
	// From the partition that takes the appends, not the partitioned table,
	// which would wait behind a rotation that a test holds at the head.
	var last *int64
	require.NoError(t, q.QueryRow(testCtx(t), "SELECT max(position) FROM "+ident(schema, fmt.Sprintf("pgstore/log_entries_%d", h.part))).Scan(&last))
	if last != nil {
		h.position = max(h.position, *last)
	}
	return h
}

// logListenerPIDs returns the backends that LISTEN on the wake-up channel of
// a schema's log: the LISTEN connections of the connectors that follow it.
func logListenerPIDs(t *testing.T, pool *pgxpool.Pool, schema string) []int32 {
	t.Helper()
	sum := sha256.Sum256([]byte(schema))
	channel := "pgstore_log_" + hex.EncodeToString(sum[:12])
	rows, err := pool.Query(testCtx(t), "SELECT pid FROM pg_stat_activity WHERE query = $1 ORDER BY pid",
		"LISTEN "+pgx.Identifier{channel}.Sanitize())
	require.NoError(t, err)
	pids, err := pgx.CollectRows(rows, pgx.RowTo[int32])
	require.NoError(t, err)
	return pids
}

// blockedBy returns the backends that wait for a lock held by pid.
func blockedBy(t *testing.T, pool *pgxpool.Pool, pid int32) []int32 {
	t.Helper()
	rows, err := pool.Query(testCtx(t), "SELECT pid FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid)) ORDER BY pid", pid)
	require.NoError(t, err)
	pids, err := pgx.CollectRows(rows, pgx.RowTo[int32])
	require.NoError(t, err)
	return pids
}

// requireConsecutive asserts that the events are at positions from+1,
// from+2, … without a gap, a repeat or a Resync.
func requireConsecutive(t *testing.T, events []faultEvent, from int64, what string) {
	t.Helper()
	for i, e := range events {
		if e.typ == pgstore.Resync {
			t.Fatalf("%s: event %d is a Resync (%v) at %s", what, i, e.reason, e.cursor)
		}
		if e.pos != from+int64(i)+1 {
			t.Fatalf("%s: event %d is at position %d, want %d (events around it: %v)", what, i, e.pos, from+int64(i)+1,
				events[max(0, i-3):min(len(events), i+3)])
		}
	}
}

// requireTheLog asserts that the events are exactly the entries, in order.
func requireTheLog(t *testing.T, events []faultEvent, entries []faultEntry, what string) {
	t.Helper()
	require.Equal(t, len(entries), len(events), "%s: as many events as entries", what)
	for i := range entries {
		if !entries[i].matches(events[i]) {
			t.Fatalf("%s: event %d is %v, the log's entry %v", what, i, events[i], entries[i])
		}
	}
}

// sentinel writes one more record and asserts that its INSERT is the next
// event of each recorder after the n it has: nothing was repeated after the
// end.
func sentinel(t *testing.T, ctx context.Context, c *pgstore.Connector, key string, recorders ...*faultRecorder) {
	t.Helper()
	counts := make([]int, len(recorders))
	for i, r := range recorders {
		counts[i] = r.count()
	}
	require.NoError(t, c.Set(ctx, key, 1, "sentinel"))
	for i, r := range recorders {
		got := r.waitFor(t, ctx, counts[i]+1)
		require.Len(t, got, counts[i]+1, "recorder %d: one event after the end, not more", i)
		require.Equal(t, pgstore.Insert, got[counts[i]].typ, "recorder %d", i)
		require.Equal(t, key, got[counts[i]].key, "recorder %d: the sentinel comes right after the last", i)
	}
}

// 1. A transaction that wrote first commits last: the second writer waits
// for it at the log's head, and the log and the feed are in commit order.
func TestChangeLogFaultOutOfOrderCommitWaitsAtTheHeadAndIsDeliveredInCommitOrder(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	schema := pgtest.Schema(t)
	c := connectSchema(t, schema, pgstore.WithChangeLog(time.Hour))
	pool := pgtest.Pool(t)
	require.NoError(t, c.Set(ctx, "t/init", 1, "init")) // the table, with its log triggers
	start := logHead(t, pool, schema).position
	got := newFaultRecorder()
	sub, err := c.Subscribe(ctx, got.handle)
	require.NoError(t, err)
	defer sub.Close(context.Background())

	raw, err := pool.Begin(ctx)
	require.NoError(t, err)
	defer raw.Rollback(ctx) //nolint:errcheck // after Commit it does nothing
	var rawPID int32
	require.NoError(t, raw.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&rawPID))
	_, err = raw.Exec(ctx, "INSERT INTO "+ident(schema, "t")+` (id, version, val) VALUES ('first', 1, '"raw"')`)
	require.NoError(t, err)
	require.Equal(t, start+1, logHead(t, raw, schema).position, "the raw transaction took the next position")

	second := make(chan error, 1)
	go func() { second <- c.Set(ctx, "t/second", 1, "connector") }()
	var waiting []int32
	waitUntil(t, ctx, "the connector's flush waits for the raw transaction", func() bool {
		select {
		case err := <-second:
			t.Fatalf("the second write returned (err %v) while the first transaction held the log's head", err)
		default:
		}
		waiting = blockedBy(t, pool, rawPID)
		return len(waiting) > 0
	})
	require.Len(t, waiting, 1)
	// On the head's row, which the first holds until it commits.
	var onHead bool
	require.NoError(t, pool.QueryRow(ctx, "SELECT EXISTS (SELECT FROM pg_locks WHERE pid = $1 AND locktype = 'tuple' AND relation = $2::regclass)",
		waiting[0], ident(schema, "pgstore/log")).Scan(&onHead))
	require.True(t, onHead, "the second writer waits on the log's head row")
	// Meanwhile the second has taken no position, and nothing is visible.
	require.Equal(t, start, logHead(t, pool, schema).position)
	require.Len(t, logEntries(t, pool, schema), int(start))
	require.Zero(t, got.count())
	select {
	case err := <-second:
		t.Fatalf("the second write returned (err %v) before the first committed", err)
	default:
	}

	require.NoError(t, raw.Commit(ctx))
	require.NoError(t, <-second)
	events := got.waitFor(t, ctx, 2)
	requireConsecutive(t, events, start, "feed")
	require.Equal(t, "t/first", events[0].key, "the first to commit comes first")
	require.Equal(t, "t/second", events[1].key)
	require.Equal(t, events[0].offset+1, events[1].offset, "the table's offsets follow the commit order too")
	requireTheLog(t, events, logEntries(t, pool, schema)[start:], "feed")
	sentinel(t, ctx, c, "t/after", got)
}

// faultRawWrite is a transaction of another client: one guarded upsert of a
// random key, sometimes inside a savepoint it rolls back, then a random wait
// before it commits, or rolls back. It locks the log's head first, as
// pgstore's batches do: a client that does not can deadlock with them (see
// TestChangeLogFaultARawUpdateDoesNotDeadlockWithAConnectorsBatch).
func faultRawWrite(ctx context.Context, pool *pgxpool.Pool, schema string, rng *rand.Rand, version *atomic.Int64, keys []string) error {
	tx, err := pool.Begin(ctx)
	if err != nil {
		return err
	}
	defer tx.Rollback(ctx) //nolint:errcheck // after Commit it does nothing
	return func() error {
		if _, err := tx.Exec(ctx, "SELECT FROM "+ident(schema, "pgstore/log")+" FOR UPDATE"); err != nil {
			return err
		}
		table, id, _ := strings.Cut(keys[rng.IntN(len(keys))], "/")
		v := version.Add(1)
		upsert := "INSERT INTO " + ident(schema, table) + " AS t (id, version, val) VALUES ($1, $2, $3::jsonb) " +
			"ON CONFLICT (id) DO UPDATE SET version = excluded.version, val = excluded.val WHERE t.version <= excluded.version"
		undo := rng.IntN(4) == 0
		if undo {
			if _, err := tx.Exec(ctx, "SAVEPOINT undone"); err != nil {
				return err
			}
		}
		if _, err := tx.Exec(ctx, upsert, id, v, fmt.Sprintf(`{"raw": %d}`, v)); err != nil {
			return err
		}
		if undo {
			if _, err := tx.Exec(ctx, "ROLLBACK TO SAVEPOINT undone"); err != nil {
				return err
			}
		}
		if _, err := tx.Exec(ctx, "SELECT pg_sleep($1)", rng.Float64()*0.01); err != nil {
			return err
		}
		if rng.IntN(5) == 0 {
			return tx.Rollback(ctx)
		}
		return tx.Commit(ctx)
	}()
}

// deadlockCounter passes a connector's log on to the test's, counting the
// messages about a deadlock (SQLSTATE 40P01), such as a batch retried after
// it was a deadlock's victim.
type deadlockCounter struct {
	slog.Handler
	n *atomic.Int64
}

func (h deadlockCounter) Handle(ctx context.Context, r slog.Record) error {
	r.Attrs(func(a slog.Attr) bool {
		if strings.Contains(a.Value.String(), "40P01") {
			h.n.Add(1)
		}
		return true
	})
	return h.Handler.Handle(ctx, r)
}

func (h deadlockCounter) WithAttrs(attrs []slog.Attr) slog.Handler {
	return deadlockCounter{h.Handler.WithAttrs(attrs), h.n}
}

func (h deadlockCounter) WithGroup(name string) slog.Handler {
	return deadlockCounter{h.Handler.WithGroup(name), h.n}
}

// 2. Eight writers on two connectors and raw transactions that hold the head
// for a random while: the subscription delivers exactly the log, gapless,
// and no key's version ever goes down.
func TestChangeLogFaultRandomWritersGiveAGaplessLogDeliveredInCommitOrder(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	schema := pgtest.Schema(t)
	var deadlocks atomic.Int64
	logger := slog.New(deadlockCounter{testLogger(t).Handler(), &deadlocks})
	opts := []pgstore.Option{pgstore.WithChangeLog(time.Hour), pgstore.WithVersionGuard(true), pgstore.WithLogger(logger)}
	conns := []*pgstore.Connector{connectSchema(t, schema, opts...), connectSchema(t, schema, opts...)}
	pool := pgtest.Pool(t)
	got := newFaultRecorder()
	sub, err := conns[1].Subscribe(ctx, got.handle)
	require.NoError(t, err)
	defer sub.Close(context.Background())
	require.Zero(t, logHead(t, pool, schema).position)
	for _, table := range []string{"a", "b"} {
		require.NoError(t, conns[0].Set(ctx, table+"/seed", 0, "seed"))
	}

	var keys []string
	for i := range 12 {
		keys = append(keys, fmt.Sprintf("%s/k%d", []string{"a", "b"}[i%2], i))
	}
	var version atomic.Int64
	errs := make(chan error, 1000)
	var wg sync.WaitGroup
	for w := range 8 {
		c := conns[w%2]
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(w), uint64(time.Now().UnixNano())))
			var pending []*pgstore.Result
			for range 60 {
				key := keys[rng.IntN(len(keys))]
				v := version.Add(1)
				value := map[string]int64{"v": v, "writer": int64(w)}
				if rng.IntN(3) == 0 {
					pending = append(pending, c.SetAsync(ctx, key, v, value))
					continue
				}
				if err := c.Set(ctx, key, v, value); err != nil && !errors.Is(err, pgstore.ErrVersionConflict) {
					errs <- fmt.Errorf("writer %d, set %s@%d: %w", w, key, v, err)
				}
			}
			for _, r := range pending {
				if err := r.Wait(ctx); err != nil && !errors.Is(err, pgstore.ErrVersionConflict) {
					errs <- fmt.Errorf("writer %d: %w", w, err)
				}
			}
		})
	}
	for r := range 2 {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(100+r), uint64(time.Now().UnixNano())))
			for range 20 {
				if err := faultRawWrite(ctx, pool, schema, rng, &version, keys); err != nil {
					errs <- fmt.Errorf("raw writer %d: %w", r, err)
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}

	head := logHead(t, pool, schema)
	events := got.waitForPosition(t, ctx, head.position)
	entries := logEntries(t, pool, schema)
	require.Len(t, entries, int(head.position), "the log holds every position up to its head")
	for i, e := range entries {
		require.EqualValues(t, i+1, e.pos, "the log's positions have no gap")
	}
	requireConsecutive(t, events, 0, "feed")
	requireTheLog(t, events, entries, "feed")

	versions := map[string]int64{}
	offsets := map[string]int64{}
	for _, e := range events {
		require.Equal(t, offsets[e.table]+1, e.offset, "offsets of %s follow on at %v", e.table, e)
		offsets[e.table] = e.offset
		if e.key == "" {
			continue
		}
		require.GreaterOrEqual(t, e.version, versions[e.key], "the version of %s went down at %v", e.key, e)
		versions[e.key] = e.version
	}
	for key, v := range versions {
		table, id, _ := strings.Cut(key, "/")
		stored, _, found := storedRow(t, conns[0], schema, table, id)
		require.True(t, found, key)
		require.Equal(t, stored, v, "the last delivered version of %s is the stored one", key)
	}
	t.Logf("%d entries", len(entries))
	require.Zero(t, deadlocks.Load(), "no batch of two connectors (of two tables, on the same keys) deadlocked with another writer")
	sentinel(t, ctx, conns[0], "a/sentinel", got)
}

// 3. The LISTEN connections are killed ten times during 20,000 writes from
// two connectors: a subscription that follows the log loses nothing, repeats
// nothing and is never told to resync.
func TestChangeLogFaultKilledListenersCostNoEventAndNoResync(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	schema := pgtest.Schema(t)
	conns := []*pgstore.Connector{
		connectSchema(t, schema, pgstore.WithChangeLog(time.Hour)),
		connectSchema(t, schema, pgstore.WithChangeLog(time.Hour)),
	}
	pool := pgtest.Pool(t)
	all1, onlyB, all2 := newFaultRecorder(), newFaultRecorder(), newFaultRecorder()
	for _, s := range []struct {
		c       *pgstore.Connector
		r       *faultRecorder
		filters []pgstore.Filter
	}{{conns[0], all1, nil}, {conns[0], onlyB, []pgstore.Filter{pgstore.ForTables("b")}}, {conns[1], all2, nil}} {
		sub, err := s.c.Subscribe(ctx, s.r.handle, s.filters...)
		require.NoError(t, err)
		defer sub.Close(context.Background())
	}

	const rounds, perRound = 10, 5000 // 50,000 writes
	killed := map[int32]bool{}
	for round := range rounds {
		var pids []int32
		waitUntil(t, ctx, "both connectors listen", func() bool {
			pids = slices.DeleteFunc(logListenerPIDs(t, pool, schema), func(pid int32) bool { return killed[pid] })
			return len(pids) == 2
		})
		results := make([]*pgstore.Result, perRound)
		for i := range results {
			key := fmt.Sprintf("%s/%d-%d", []string{"a", "b"}[i/2%2], round, i)
			results[i] = conns[i%2].SetAsync(ctx, key, 1, i)
		}
		// Killed while those are written.
		for _, pid := range pids {
			var ok bool
			require.NoError(t, pool.QueryRow(ctx, "SELECT pg_terminate_backend($1)", pid).Scan(&ok))
			require.True(t, ok)
			killed[pid] = true
		}
		waitAll(t, results)
	}

	head := logHead(t, pool, schema)
	require.EqualValues(t, 2+rounds*perRound, head.position, "two CREATE_TABLE and every write")
	entries := logEntries(t, pool, schema)
	var bEntries []faultEntry
	for _, e := range entries {
		if e.table == "b" {
			bEntries = append(bEntries, e)
		}
	}
	for name, r := range map[string]*faultRecorder{"first connector": all1, "second connector": all2} {
		events := r.waitForPosition(t, ctx, head.position)
		requireConsecutive(t, events, 0, name)
		requireTheLog(t, events, entries, name)
	}
	requireTheLog(t, onlyB.waitForPosition(t, ctx, bEntries[len(bEntries)-1].pos), bEntries, "ForTables(b)")
	for _, r := range []*faultRecorder{all1, onlyB, all2} {
		require.Zero(t, r.resyncs)
	}
	sentinel(t, ctx, conns[1], "b/sentinel", all1, onlyB, all2)
}

// 4. A slow handler (1 ms an event) during 100,000 writes of 2 KiB values
// (200 MiB in all) lags in bounded memory: the backlog stays in the log,
// and the subscription catches up with every event, in order.
//
// Not parallel: the heap measured is the process's, and a sequential test
// runs alone (the parallel ones wait for it).
func TestChangeLogFaultASlowHandlerLagsInBoundedMemoryAndCatchesUp(t *testing.T) {
	// 100,000 events at 1 ms each: a minute and a half at the least.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	// The writes' own buffer is bounded too, so that what the heap holds
	// is the feed's doing.
	c := connect(t, pgstore.WithChangeLog(time.Hour), pgstore.WithBufferLimit(8<<20))
	got := newFaultRecorder()
	got.delay = time.Millisecond // a thousand events a second at most: far slower than the writes
	sub, err := c.Subscribe(ctx, got.handle)
	require.NoError(t, err)
	defer sub.Close(context.Background())

	// The peak of the heap, sampled while the test runs.
	var peak atomic.Uint64
	stop, sampled := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(sampled)
		tick := time.NewTicker(10 * time.Millisecond)
		defer tick.Stop()
		var ms runtime.MemStats
		for {
			runtime.ReadMemStats(&ms)
			if ms.HeapAlloc > peak.Load() {
				peak.Store(ms.HeapAlloc)
			}
			select {
			case <-stop:
				return
			case <-tick.C:
			}
		}
	}()
	defer func() {
		close(stop)
		<-sampled
	}()

	const n = 100_000
	value := json.RawMessage(`"` + randomASCII(t, 2<<10) + `"`)
	results := make([]*pgstore.Result, n)
	for i := range results {
		results[i] = c.SetAsync(ctx, fmt.Sprintf("slow/%05d", i), 1, value)
	}
	waitAll(t, results)
	backlog := n + 1 - got.count()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	t.Logf("writes done: %d events (%d MiB of values) not yet delivered; live heap %d MiB", backlog, backlog*len(value)>>20, ms.HeapAlloc>>20)
	require.Greater(t, backlog, 20_000, "the handler lags: more than 20,000 events (40 MiB of values) wait")
	require.Less(t, ms.HeapAlloc, uint64(backlog*len(value)), "the backlog waits in the log, not in memory: the live heap is smaller than it")

	events := got.waitFor(t, ctx, n+1)
	requireConsecutive(t, events, 0, "feed")
	require.Equal(t, pgstore.CreateTable, events[0].typ)
	for i, e := range events[1:] {
		require.Equal(t, fmt.Sprintf("slow/%05d", i), e.key, "in the order of the writes")
	}
	// The write buffer (8 MiB), three pages of the log (at most 8 MiB each,
	// here 500 entries of 2 KiB, 1 MiB), the driver's buffers, and the
	// garbage collector's headroom, which doubles the heap: under 128 MiB,
	// less than the 200 MiB of values.
	const bound = 128 << 20
	t.Logf("peak heap %d MiB (bound %d MiB)", peak.Load()>>20, bound>>20)
	require.Less(t, peak.Load(), uint64(bound), "the heap stays bounded while 200 MiB of values go through a lagging subscription")
	sentinel(t, ctx, c, "slow/sentinel", got)
}

// jsonEqual reports whether two JSON texts hold the same value.
func jsonEqual(t *testing.T, a, b []byte) bool {
	t.Helper()
	var va, vb any
	require.NoError(t, json.Unmarshal(a, &va))
	require.NoError(t, json.Unmarshal(b, &vb))
	return reflect.DeepEqual(va, vb)
}

// 5. An event's Value is the value its change wrote, up to values of 3 MB;
// three of them together cross the byte limit of a page of the log.
func TestChangeLogFaultEventValuesAreTheValuesWrittenUpToMegabytes(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c := connect(t, pgstore.WithChangeLog(time.Hour))
	got := newEventLog()
	sub, err := c.Subscribe(ctx, got.handle)
	require.NoError(t, err)
	defer sub.Close(context.Background())

	big := func() string {
		return `{"blob": "` + randomASCII(t, 3_000_000) + `", "n": [1, 2, 3]}`
	}
	type change struct {
		key   string
		value string // "" for a delete
	}
	// Each phase is written at once and waited for: no key is twice in
	// one, so none coalesce.
	phases := [][]change{
		{
			{"v/object", `{"b": [1, 2.5, "x", null], "a": {"nested": true}, "u": "\u00e9\u6f22 \"quoted\" \\ back \ud83d\ude00"}`},
			{"v/number", `-12.5e3`},
			{"v/string", `"just text"`},
			{"v/array", `[false, {}, [], 0]`},
		},
		{{"v/big1", big()}, {"v/big2", big()}, {"v/big3", big()}, {"v/small", `"after the big ones, in the same batch"`}},
		{{"v/object", `{"changed": 1}`}, {"v/big1", big()}, {"v/number", ""}},
		{{"v/after", `"a small value after a page cut short"`}},
	}
	for p, phase := range phases {
		results := make([]*pgstore.Result, len(phase))
		for i, ch := range phase {
			if ch.value == "" {
				results[i] = c.DeleteAsync(ctx, ch.key)
			} else {
				results[i] = c.SetAsync(ctx, ch.key, int64(p+1), json.RawMessage(ch.value))
			}
		}
		waitAll(t, results)
	}

	// The phases come in order; the changes of one, in the order of the
	// batches it was flushed in.
	n := 1
	for _, phase := range phases {
		n += len(phase)
	}
	events := got.waitFor(t, n)
	require.Equal(t, pgstore.CreateTable, events[0].Type)
	next := 1
	for p, phase := range phases {
		byKey := map[string]pgstore.Event{}
		for _, e := range events[next : next+len(phase)] {
			byKey[e.Key] = e
		}
		next += len(phase)
		for _, w := range phase {
			e, ok := byKey[w.key]
			require.True(t, ok, "phase %d: no event of %s", p, w.key)
			if w.value == "" {
				require.Equal(t, pgstore.Delete, e.Type)
				require.Nil(t, e.Value, "a delete has no value")
				continue
			}
			require.EqualValues(t, p+1, e.Version)
			require.True(t, jsonEqual(t, []byte(w.value), e.Value), "the value of %s: %d bytes written, %d delivered, starting %.80s",
				w.key, len(w.value), len(e.Value), e.Value)
			rec, err := c.Get(ctx, w.key)
			if errors.Is(err, pgstore.ErrNotFound) {
				continue // deleted since
			}
			require.NoError(t, err)
			if rec.Version == e.Version {
				require.Equal(t, string(rec.Value), string(e.Value), "the text of jsonb, as Get returns it")
			}
		}
	}
}

// 6. Two connectors rotate the log at once: the janitor's lock lets one at
// a time; entries are gone after four rotations, exactly up to the cursor
// the head records, and a subscription within the retained partitions goes
// on without a Resync.
func TestChangeLogFaultRotationsFromTwoConnectorsTakeTurnsAndKeepTheRetained(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	schema := pgtest.Schema(t)
	c1 := connectSchema(t, schema, pgstore.WithChangeLog(time.Hour))
	c2 := connectSchema(t, schema, pgstore.WithChangeLog(time.Hour))
	pool := pgtest.Pool(t)
	live := newFaultRecorder()
	sub, err := c2.Subscribe(ctx, live.handle)
	require.NoError(t, err)
	defer sub.Close(context.Background())
	results := setMany(ctx, c1, "k", 10)
	waitAll(t, results)
	live.waitForPosition(t, ctx, logHead(t, pool, schema).position)

	// One rotation waits on the head while it holds the janitor's lock:
	// the other, meanwhile, returns without rotating.
	part := logHead(t, pool, schema).part
	hold, err := pool.Begin(ctx)
	require.NoError(t, err)
	defer hold.Rollback(ctx) //nolint:errcheck // after Commit it does nothing
	var holdPID int32
	require.NoError(t, hold.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&holdPID))
	_, err = hold.Exec(ctx, "SELECT FROM "+ident(schema, "pgstore/log")+" FOR UPDATE")
	require.NoError(t, err)
	first := make(chan error, 1)
	go func() { first <- c1.RotateLog(ctx) }()
	waitUntil(t, ctx, "the first rotation waits on the head", func() bool { return len(blockedBy(t, pool, holdPID)) == 1 })
	other := make(chan error, 1)
	go func() { other <- c2.RotateLog(ctx) }()
	waitUntil(t, ctx, "the second rotation returns", func() bool {
		select {
		case err := <-other:
			require.NoError(t, err)
			return true
		default:
		}
		if n := len(blockedBy(t, pool, holdPID)); n > 1 {
			require.NoError(t, hold.Rollback(ctx))
			t.Fatalf("the second rotation waits on the head too (%d waiters): both would rotate", n)
		}
		return false
	})
	require.Equal(t, part, logHead(t, pool, schema).part)
	require.NoError(t, hold.Commit(ctx))
	require.NoError(t, <-first)
	part = (part + 1) % 4
	require.Equal(t, part, logHead(t, pool, schema).part, "one rotation, not two")

	// Many times at once: each round rotates once, or twice when the calls
	// did not overlap; never an error.
	const rounds = 30
	rotations, single := 0, 0
	for range rounds {
		start := make(chan struct{})
		var errs [2]error
		var wg sync.WaitGroup
		for i, c := range []*pgstore.Connector{c1, c2} {
			wg.Go(func() {
				<-start
				errs[i] = c.RotateLog(ctx)
			})
		}
		close(start)
		wg.Wait()
		require.NoError(t, errs[0])
		require.NoError(t, errs[1])
		next := logHead(t, pool, schema).part
		d := (next - part + 4) % 4
		require.Contains(t, []int{1, 2}, d, "a round of two calls rotated %d times", d)
		rotations += d
		if d == 1 {
			single++
		}
		part = next
	}
	t.Logf("%d rounds of two calls: %d rotations; in %d rounds one call found the other rotating", rounds, rotations, single)

	// Retention: entries written before four rotations are gone, those
	// written after the first are not.
	results = setMany(ctx, c1, "k", 5)
	waitAll(t, results)
	old := live.waitForPosition(t, ctx, logHead(t, pool, schema).position)
	last := old[len(old)-1]
	require.NoError(t, c1.RotateLog(ctx))
	for i := range 5 {
		require.NoError(t, c2.Set(ctx, fmt.Sprintf("k/kept-%d", i), 1, i))
	}
	kept := logHead(t, pool, schema)
	live.waitForPosition(t, ctx, kept.position)
	for _, c := range []*pgstore.Connector{c2, c1, c2} {
		require.NoError(t, c.RotateLog(ctx))
	}
	head := logHead(t, pool, schema)
	require.Equal(t, last.pos, head.dropped, "the head records the last position removed")
	entries := logEntries(t, pool, schema)
	require.Len(t, entries, 5, "only the entries written after the first of the four rotations are left")
	for i, e := range entries {
		require.Equal(t, last.pos+int64(i)+1, e.pos)
	}

	// A subscription at the last removed position reads on; one before it
	// is told its cursor expired.
	resumed := newFaultRecorder()
	sub2, err := c1.Subscribe(ctx, resumed.handle, pgstore.After(last.cursor))
	require.NoError(t, err)
	defer sub2.Close(context.Background())
	requireTheLog(t, resumed.waitFor(t, ctx, 5), entries, "resumed at the retention's edge")
	expired := newFaultRecorder()
	before := last.cursor[:strings.IndexByte(last.cursor, '.')+1] + strconv.FormatInt(last.pos-1, 10)
	sub3, err := c1.Subscribe(ctx, expired.handle, pgstore.After(before))
	require.NoError(t, err)
	defer sub3.Close(context.Background())
	e := expired.waitFor(t, ctx, 1)[0]
	require.Equal(t, pgstore.Resync, e.typ)
	require.ErrorIs(t, e.reason, pgstore.ErrCursorExpired)
	require.Equal(t, head.position, e.pos, "and goes on from the end")

	events := live.snapshot()
	requireConsecutive(t, events, 0, "the live subscription")
	sentinel(t, ctx, c1, "k/sentinel", live, resumed)
	require.Zero(t, live.resyncs)
	require.Zero(t, resumed.resyncs)
}

// 7. DropTable appends DESTROY_TABLE to the log, from a connector that knows
// of the log or not; and a connector that switches the log on over existing
// tables gives them the log's triggers, so that every connector's writes to
// them appear in it.
func TestChangeLogFaultDropTableIsLoggedAndSwitchingTheLogOnTakesInExistingTables(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	schema := pgtest.Schema(t)
	pool := pgtest.Pool(t)
	plain := connectSchema(t, schema, pgstore.WithoutChangeLog())
	require.NoError(t, plain.Set(ctx, "old/1", 1, "before the log"))
	require.NoError(t, plain.Set(ctx, "gone/1", 1, "before the log"))
	require.Equal(t, []string{"pgstore_delete", "pgstore_insert", "pgstore_update"}, tableTriggers(t, pool, schema, "old"))

	logged := connectSchema(t, schema, pgstore.WithChangeLog(time.Hour))
	for _, table := range []string{"old", "gone"} {
		require.Equal(t, logTriggers, tableTriggers(t, pool, schema, table),
			"the existing table %s appends to the log, and notifies no more", table)
	}
	got := newFaultRecorder()
	sub, err := logged.Subscribe(ctx, got.handle)
	require.NoError(t, err)
	defer sub.Close(context.Background())
	require.NoError(t, logged.Set(ctx, "old/1", 2, "after the log"))
	require.NoError(t, plain.Set(ctx, "old/2", 1, "from the connector that connected before the log"))
	require.NoError(t, plain.Delete(ctx, "old/1"))
	require.NoError(t, logged.DropTable(ctx, "gone"))
	require.NoError(t, plain.DropTable(ctx, "old"))
	require.NoError(t, plain.Set(ctx, "gone/2", 1, "the table again"))

	events := got.waitFor(t, ctx, 7)
	var seen []string
	for _, e := range events {
		seen = append(seen, fmt.Sprintf("%s %s %s@%d off %d", e.typ, e.table, e.key, e.version, e.offset))
	}
	require.Equal(t, []string{
		"UPDATE old old/1@2 off 1",
		"INSERT old old/2@1 off 2",
		"DELETE old old/1@2 off 3",
		"DESTROY_TABLE gone @0 off 1",
		"DESTROY_TABLE old @0 off 4",
		"CREATE_TABLE gone @0 off 2",
		"INSERT gone gone/2@1 off 3",
	}, seen)
	requireConsecutive(t, events, 0, "feed")
	requireTheLog(t, events, logEntries(t, pool, schema), "feed")
	require.Equal(t, logTriggers, tableTriggers(t, pool, schema, "gone"),
		"a table made again by a connector that connected before the log gets the log's triggers")
	sentinel(t, ctx, logged, "gone/sentinel", got)
}

// A subscription of the NOTIFY feed, made before another connector switches
// the log on, must not go silent: the log's triggers send no notification,
// so it must get the writes some other way, or a Resync.
func TestChangeLogFaultAFeedSubscribedBeforeTheLogIsSwitchedOnIsNotLeftSilent(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	schema := pgtest.Schema(t)
	plain := connectSchema(t, schema, pgstore.WithoutChangeLog())
	got := newFaultRecorder()
	sub, err := plain.Subscribe(ctx, got.handle)
	require.NoError(t, err)
	defer sub.Close(context.Background())
	require.NoError(t, plain.Set(ctx, "t/1", 1, 1))
	require.Len(t, got.waitFor(t, ctx, 2), 2) // CREATE_TABLE and INSERT, by NOTIFY

	logged := connectSchema(t, schema, pgstore.WithChangeLog(time.Hour))
	follower := newFaultRecorder()
	sub2, err := logged.Subscribe(ctx, follower.handle)
	require.NoError(t, err)
	defer sub2.Close(context.Background())
	require.NoError(t, plain.Set(ctx, "t/2", 1, 2))
	follower.waitFor(t, ctx, 1) // in the log, committed

	// The bound of a lost event, not a measure of speed: the log is
	// polled every second.
	bounded, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	for {
		events := got.snapshot()
		if e := events[len(events)-1]; e.key == "t/2" || e.typ == pgstore.Resync {
			return
		}
		select {
		case <-got.more:
		case <-bounded.Done():
			t.Fatalf("the NOTIFY subscription made before another connector switched the log on got neither t/2 nor a Resync "+
				"in 5s (the log's triggers notify no more, and it does not follow the log): %v", events)
		}
	}
}

// 8. Filters on a subscription that follows the log deliver only what
// matches, and still move it past what does not: pages of others' entries do
// not hold up a matching one behind them.
func TestChangeLogFaultFilteredSubscriptionsSkipOthersEntriesAndGetTheirs(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c, schema := connectNamed(t, pgstore.WithChangeLog(time.Hour))
	pool := pgtest.Pool(t)
	subs := []struct {
		name    string
		filters []pgstore.Filter
		match   func(faultEntry) bool
		r       *faultRecorder
	}{
		{"ForTables(b)", []pgstore.Filter{pgstore.ForTables("b")}, func(e faultEntry) bool { return e.table == "b" }, nil},
		{"ForEvents(Delete)", []pgstore.Filter{pgstore.ForEvents(pgstore.Delete)}, func(e faultEntry) bool { return e.op == "D" }, nil},
		{"ForTables(b) ForEvents(Insert)", []pgstore.Filter{pgstore.ForTables("b"), pgstore.ForEvents(pgstore.Insert)},
			func(e faultEntry) bool { return e.table == "b" && e.op == "I" }, nil},
		{"ForEvents(CreateTable, DestroyTable)", []pgstore.Filter{pgstore.ForEvents(pgstore.CreateTable, pgstore.DestroyTable)},
			func(e faultEntry) bool { return e.op == "C" || e.op == "X" }, nil},
		{"ForTables(a, c)", []pgstore.Filter{pgstore.ForTables("a", "c")}, func(e faultEntry) bool { return e.table == "a" || e.table == "c" }, nil},
	}
	for i := range subs {
		subs[i].r = newFaultRecorder()
		sub, err := c.Subscribe(ctx, subs[i].r.handle, subs[i].filters...)
		require.NoError(t, err)
		defer sub.Close(context.Background())
	}

	waitAll(t, setMany(ctx, c, "a", 1200)) // pages of entries of a alone
	require.NoError(t, c.Set(ctx, "b/1", 1, "b"))
	results := make([]*pgstore.Result, 0, 700)
	for i := range 600 {
		results = append(results, c.SetAsync(ctx, fmt.Sprintf("a/%d", i), 2, "again"))
	}
	for i := range 100 {
		results = append(results, c.DeleteAsync(ctx, fmt.Sprintf("a/%d", 600+i)))
	}
	waitAll(t, results)
	require.NoError(t, c.Delete(ctx, "b/1"))
	require.NoError(t, c.DropTable(ctx, "a"))
	require.NoError(t, c.Set(ctx, "b/2", 1, "b"))
	// A last event for each: they come after all the others.
	require.NoError(t, c.Delete(ctx, "b/2"))
	require.NoError(t, c.DropTable(ctx, "b"))
	require.NoError(t, c.Set(ctx, "c/last", 1, "c"))

	entries := logEntries(t, pool, schema)
	for _, s := range subs {
		var want []faultEntry
		for _, e := range entries {
			if s.match(e) {
				want = append(want, e)
			}
		}
		events := s.r.waitForPosition(t, ctx, want[len(want)-1].pos)
		requireTheLog(t, events, want, s.name)
		require.Zero(t, s.r.resyncs, s.name)
	}
}

// A client that is not pgstore updates a row of a logged table in one
// statement that takes a while after locking the row (here a pg_sleep; in
// life a statement of many rows), while a connector's batch writes the same
// row. Both must commit: neither may be chosen as a deadlock's victim.
func TestChangeLogFaultARawUpdateDoesNotDeadlockWithAConnectorsBatch(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c, schema := connectNamed(t, pgstore.WithChangeLog(time.Hour))
	pool := pgtest.Pool(t)
	require.NoError(t, c.Set(ctx, "t/k", 1, "first"))
	got := newFaultRecorder()
	sub, err := c.Subscribe(ctx, got.handle)
	require.NoError(t, err)
	defer sub.Close(context.Background())

	conn, err := pool.Acquire(ctx)
	require.NoError(t, err)
	rawPID := int32(conn.Conn().PgConn().PID())
	var rawErr error
	rawDone := make(chan struct{})
	defer func() {
		<-rawDone
		conn.Release()
	}()
	go func() {
		defer close(rawDone)
		// The row is locked by the CTE's update; the log's trigger runs
		// at the statement's end, after the sleep.
		_, rawErr = conn.Exec(ctx, "WITH u AS (UPDATE "+ident(schema, "t")+` SET version = 2, val = '"raw"' WHERE id = 'k' RETURNING id)
			SELECT pg_sleep(1.5) FROM u`)
	}()
	waitUntil(t, ctx, "the raw update holds the row and sleeps", func() bool {
		var sleeping bool
		require.NoError(t, pool.QueryRow(ctx, "SELECT coalesce(wait_event = 'PgSleep', false) FROM pg_stat_activity WHERE pid = $1",
			rawPID).Scan(&sleeping))
		return sleeping
	})
	write := c.SetAsync(ctx, "t/k", 3, "connector")
	waitUntil(t, ctx, "the connector's batch waits for the raw update's row", func() bool {
		select {
		case <-rawDone:
			t.Log("the raw update ended before the connector's batch reached its row: the scenario did not happen")
			return true
		default:
		}
		return len(blockedBy(t, pool, rawPID)) == 1
	})
	<-rawDone
	require.NoError(t, write.Wait(ctx))
	require.NoError(t, rawErr, "the raw update was the victim of a deadlock with the connector's batch, "+
		"which took the log's head before the row, while the raw statement's trigger takes it after")
	events := got.waitFor(t, ctx, 2)
	require.Equal(t, []int64{2, 3}, []int64{events[0].version, events[1].version})
}

// pgstore's batches tell the head-lock trigger that they hold the head (see
// lockHeadSQL), so that it is not called twice per statement; a raw writer
// whose transaction names another schema there still takes this one's.
func TestChangeLogFaultARawWriteTakesTheHeadUnlessItHoldsThisSchemasHead(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c, schema := connectNamed(t, pgstore.WithChangeLog(time.Hour))
	require.NoError(t, c.Set(ctx, "t/k", 1, "first"))
	pool := pgtest.Pool(t)
	headFree := func() bool {
		_, err := pool.Exec(ctx, "SELECT FROM "+ident(schema, "pgstore/log")+" FOR UPDATE NOWAIT")
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Code == "55P03" {
			return false
		}
		require.NoError(t, err)
		return true
	}
	setFlag := func(value string) string { // the flag pgstore's batches set, here by hand; value holds no quote
		return "SELECT set_config('pgstore.head_locked', '" + value + "', true)"
	}
	for _, tc := range []struct {
		what  string
		stmts []string // run in the transaction before a raw statement that changes no row
		free  bool     // whether the head is then free
	}{
		{"no flag", nil, false},
		{"another schema's flag", []string{setFlag("another schema")}, false},
		{"the flag of a schema whose name begins with this one's", []string{setFlag(schema + "x")}, false},
		// A flag for this schema set in a savepoint rolled back goes with
		// it, as the lock does: the trigger locks the head again.
		{"this schema's flag, in a savepoint rolled back", []string{"SAVEPOINT s", setFlag(schema), "ROLLBACK TO SAVEPOINT s"}, false},
		// The flag for this schema is what pgstore's batches set once they
		// hold the head: the trigger is then skipped. Set by hand without
		// the lock, it costs the lock order, as its doc says.
		{"this schema's flag", []string{setFlag(schema)}, true},
	} {
		tx, err := pool.Begin(ctx)
		require.NoError(t, err)
		defer tx.Rollback(ctx) // on a failure, before the schema is dropped
		for _, stmt := range tc.stmts {
			_, err = tx.Exec(ctx, stmt)
			require.NoError(t, err)
		}
		_, err = tx.Exec(ctx, "UPDATE "+ident(schema, "t")+` SET val = '"raw"' WHERE false`)
		require.NoError(t, err)
		if tc.free {
			require.True(t, headFree(), "with %s, the trigger is skipped", tc.what)
		} else {
			require.False(t, headFree(), "a raw statement that changed no row, with %s, left the head unlocked", tc.what)
		}
		require.NoError(t, tx.Rollback(ctx))
		require.True(t, headFree(), "after the rollback of the transaction with %s", tc.what)
	}
}

// 11. A session elsewhere that listens and stops reading fills the
// notification queue. With the change log, writes then go on without their
// wake-up, and subscriptions still get every change, by polling the log.
// The queue takes 8 GB to fill half-way, the bound of the real trigger: on a
// private server, the test fills 1% of it and moves the trigger's bound
// there.
func TestChangeLogFaultAFullNotificationQueueCostsLatencyNotWrites(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	url := pgtest.Private(t)
	schema := "pgstore_queue"
	writer := connectURL(t, url, schema, pgstore.WithChangeLog(time.Hour))
	reader := connectURL(t, url, schema)
	require.NoError(t, writer.Set(ctx, "q/warm", 0, json.RawMessage(`{}`)))
	require.NoError(t, writer.SetLogNotifyRoom(ctx, 0.01))

	// A listener that reads, on the log's channel: what it hears shows
	// whether the writes sent their wake-up.
	wakes, err := pgx.Connect(ctx, url)
	require.NoError(t, err)
	defer wakes.Close(context.Background())
	channel := pgstore.LogChannel(schema)
	_, err = wakes.Exec(ctx, "LISTEN "+pgx.Identifier{channel}.Sanitize())
	require.NoError(t, err)

	holdNotificationQueue(t, ctx, url)
	sender, err := pgx.Connect(ctx, url)
	require.NoError(t, err)
	defer sender.Close(context.Background())
	var usage float64
	require.NoError(t, sender.QueryRow(ctx, "SELECT pg_notification_queue_usage()").Scan(&usage))
	require.Greater(t, usage, 0.01, "the queue is past the trigger's bound")

	got := newFaultRecorder()
	sub, err := reader.Subscribe(ctx, got.handle, pgstore.ForTables("q"))
	require.NoError(t, err)
	defer sub.Close(context.Background())
	const n = 20
	for i := range n {
		require.NoError(t, writer.Set(ctx, fmt.Sprintf("q/%02d", i), 1, json.RawMessage(`{"i":1}`)), "a write with the queue past the bound")
	}
	events := got.waitFor(t, ctx, n)
	for i, e := range events {
		require.Equal(t, fmt.Sprintf("q/%02d", i), e.key, "every change, in order, from another connector's subscription")
	}

	// Notifications arrive in commit order: a wake-up sent by the writes
	// would be heard before this one, sent after them.
	_, err = sender.Exec(ctx, "SELECT pg_notify($1, 'after the writes')", channel)
	require.NoError(t, err)
	heard, err := wakes.WaitForNotification(ctx)
	require.NoError(t, err)
	require.Equal(t, "after the writes", heard.Payload, "the writes sent no wake-up past the bound")
}
