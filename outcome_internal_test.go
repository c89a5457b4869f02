package pgstore

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/pgstore/pgstore/internal/pgtest"
)

func newTestSink(t *testing.T) *sqlSink { return newTestConnector(t).sink }

// newTestConnector connects to a schema of the test's own, closed when the
// test ends.
func newTestConnector(t *testing.T, opts ...Option) *Connector {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	c, err := Connect(ctx, pgtest.URL(t), append([]Option{WithSchema(pgtest.Schema(t))}, opts...)...)
	require.NoError(t, err)
	t.Cleanup(func() { _ = c.Close(context.Background()) })
	return c
}

func claim(t *testing.T, s *sqlSink, a lostAttempt) bool {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	conn, err := s.connectAside(ctx)
	require.NoError(t, err)
	defer conn.Close(ctx)
	committed, err := s.fence(ctx, conn, a)
	require.NoError(t, err)
	return committed
}

// A claim whose own answer was lost is asked again: it must recognise its
// own row, not take it for the attempt's.
func TestAClaimAskedAgainRecognisesItsOwnRow(t *testing.T) {
	t.Parallel()
	s := newTestSink(t)
	a := lostAttempt{token: newToken()}
	require.False(t, claim(t, s, a), "no attempt wrote the token: it did not commit")
	require.False(t, claim(t, s, a), "asked again, the claim's own row still says it did not")

	committed := lostAttempt{token: newToken()}
	_, err := s.c.pool.Exec(context.Background(), "INSERT INTO "+pgx.Identifier{s.c.cfg.schema, commitsTable}.Sanitize()+
		" (token) VALUES ($1::uuid)", committed.token) // as the attempt's transaction does
	require.NoError(t, err)
	require.True(t, claim(t, s, committed))
	require.True(t, claim(t, s, committed))
}

// A claim is all that fences an attempt whose backend is not known: it is not
// deleted with the next batch, as the token of one whose backend was ended
// or that committed is.
func TestAClaimThatAloneFencesAnAttemptIsKept(t *testing.T) {
	s := &sqlSink{}
	s.settle(lostAttempt{token: "behind a pooler"}, false)
	require.Empty(t, s.spent)
	s.settle(lostAttempt{token: "ended", backend: backend{pid: 42}}, false)
	s.settle(lostAttempt{token: "committed"}, true)
	require.Equal(t, []string{"ended", "committed"}, s.spent)
}

// The tokens of settled attempts are deleted spentBatch at a time, by the
// marker of a batch that then commits; a batch that does not commit leaves
// them to the next.
func TestSpentTokensAreDeletedInGroupsByABatchThatCommits(t *testing.T) {
	s := &sqlSink{c: &Connector{cfg: config{schema: "ds"}}}
	marker := func(token string) *pgx.QueuedQuery {
		var pb pgx.Batch
		s.queueMarker(&pb, token, true)
		require.Len(t, pb.QueuedQueries, 1)
		return pb.QueuedQueries[0]
	}
	for i := range spentBatch {
		q := marker(fmt.Sprint("t", i))
		require.NotContains(t, q.SQL, "DELETE", "batch %d deletes before %d tokens gathered", i, spentBatch)
		s.committed(fmt.Sprint("t", i))
	}
	require.Len(t, s.spent, spentBatch)

	q := marker("lost")
	require.Contains(t, q.SQL, "DELETE")
	require.Equal(t, s.spent, q.Arguments[1], "it deletes every spent token")
	// Its answer was lost and it did not commit: the next batch deletes
	// them again, and the lost attempt's token once it is settled.
	s.settle(lostAttempt{token: "lost", backend: backend{pid: 42}}, false)
	q = marker("next")
	require.Len(t, q.Arguments[1], spentBatch+1)
	s.committed("next")
	require.Equal(t, []string{"next"}, s.spent, "what it deleted is no longer spent; its own token is")
}

// On a schema with a change log, a flush's marker takes the log's head lock
// in its own statement, deleting spent tokens or not; the staged path, which
// locks the head at its BEGIN, asks for the marker alone.
func TestOnALoggedSchemaTheMarkerStatementTakesTheHeadLock(t *testing.T) {
	s := &sqlSink{c: &Connector{cfg: config{schema: "ds"}}}
	marker := func(lockHead bool) string {
		var pb pgx.Batch
		s.queueMarker(&pb, "token", lockHead)
		require.Len(t, pb.QueuedQueries, 1)
		return pb.QueuedQueries[0].SQL
	}
	require.NotContains(t, marker(true), "FOR UPDATE", "no log, no head")
	s.c.logged.Store(true)
	require.NotContains(t, marker(false), "FOR UPDATE")
	sql := marker(true)
	require.Contains(t, sql, "INSERT INTO")
	require.Contains(t, sql, "locked AS ("+lockHeadSQL("ds")+")")
	require.Contains(t, sql, "FROM locked", "the insert waits for the lock")
	for i := range spentBatch {
		s.committed(fmt.Sprint("t", i))
	}
	sql = marker(true)
	require.Contains(t, sql, "DELETE")
	require.Contains(t, sql, "EXISTS (SELECT FROM locked)", "the deletes wait for the lock")
}

// A page asks for as many entries as fit its byte bound at the size of the
// last page's values: a log of large values is not sent 500 entries at a
// time only to be cut at the client.
func TestAPageAsksForWhatFitsItsByteBound(t *testing.T) {
	small := []logEntry{{text: "t/k", value: make([]byte, 200)}}
	require.Equal(t, logPageEntries, nextLimit(small, logFirstPage))
	large := []logEntry{{text: "t/k", value: make([]byte, 1<<20)}, {text: "t/k", value: make([]byte, 1<<20)}}
	require.Equal(t, 7, nextLimit(large, logPageEntries))
	huge := []logEntry{{text: "t/k", value: make([]byte, 16<<20)}}
	require.Equal(t, 1, nextLimit(huge, logPageEntries))
	require.Equal(t, 33, nextLimit(nil, 33), "an empty page says nothing of sizes")
}

// A lag is measured in one clock: an entry's time, the server's, is told in
// the client's by how far the client's clock was ahead when the log was read.
func TestAnEntrysTimeIsToldInTheClientsClock(t *testing.T) {
	server := time.Date(2026, 12, 2, 9, 0, 0, 0, time.UTC)
	head := logHeadRow{now: server, skew: time.Hour} // the client's clock is an hour ahead
	appended := server.Add(-2 * time.Second)
	require.Equal(t, server.Add(time.Hour-2*time.Second), head.clientTime(appended),
		"appended two seconds before the read, by either clock")
}

// A read of the log takes the page's generic plan, which the plan cache
// would stop choosing once the log is large, and leaves the setting that
// makes it to that read: the next query on the connection plans as usual.
func TestALogReadForcesTheGenericPlanForItselfOnly(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c := newTestConnector(t, WithChangeLog(time.Hour))
	conn, err := c.pool.Acquire(ctx)
	require.NoError(t, err)
	defer conn.Release()

	var before, during, after string
	require.NoError(t, conn.QueryRow(ctx, "SHOW plan_cache_mode").Scan(&before))
	var pb pgx.Batch
	pb.Queue(readHeadGenericSQL(c.cfg.schema, -1))
	pb.Queue("SHOW plan_cache_mode").QueryRow(func(row pgx.Row) error { return row.Scan(&during) })
	require.NoError(t, conn.SendBatch(ctx, &pb).Close())
	require.NoError(t, conn.QueryRow(ctx, "SHOW plan_cache_mode").Scan(&after))
	require.Equal(t, "force_generic_plan", during, "for the page's statement, after the head's in the batch")
	require.Equal(t, before, after)
}

// readLog measures how far the client's clock is ahead of the server's: on
// one machine, where the two clocks are one, that is not negative and no
// more than the read took.
func TestAReadOfTheLogMeasuresTheClocksDifferenceWithinTheRead(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c := newTestConnector(t, WithChangeLog(time.Hour))
	big := strings.Repeat("x", 1<<20)
	for i := range 8 {
		require.NoError(t, c.Set(ctx, fmt.Sprintf("t/k%d", i), 1, big))
	}
	start := time.Now()
	page, head, err := c.readLog(ctx, c.cfg.schema, 0, logPageEntries, -1)
	took := time.Since(start)
	require.NoError(t, err)
	require.NotEmpty(t, page)
	require.GreaterOrEqual(t, head.skew, -50*time.Millisecond, "the server's clock is this machine's")
	require.LessOrEqual(t, head.skew, took, "measured within the read")
}

// A reader at the log's end reads the partition that took the appends at its
// last read; what that partition cannot give it (the log rotated since, or
// the partition was emptied and reused) it reads from the whole log. So the
// partition it guesses never changes what it reads: the page is the whole
// log's, or its start up to the partition's last entry, which the next read
// goes on from.
func TestAReadOfOnePartitionGivesTheStartOfWhatTheWholeLogWould(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c := newTestConnector(t, WithChangeLog(time.Hour))
	write := func(n int) {
		for range n {
			require.NoError(t, c.Set(ctx, "t/k", 1, 1))
		}
	}
	// From every position the log still holds, guessing every partition.
	sweep := func() {
		t.Helper()
		head, err := readHead(ctx, c.pool, c.cfg.schema)
		require.NoError(t, err)
		for pos := head.dropped; pos <= head.position; pos++ {
			want, _, err := c.readLog(ctx, c.cfg.schema, pos, logPageEntries, -1)
			require.NoError(t, err)
			for part := range logParts {
				got, _, err := c.readLog(ctx, c.cfg.schema, pos, logPageEntries, part)
				require.NoError(t, err)
				require.Equal(t, len(want) == 0, len(got) == 0, "from %d, partition %d", pos, part)
				require.Equal(t, want[:len(got)], got, "from %d, partition %d (the head's is %d)", pos, part, head.part)
			}
		}
	}
	write(3)
	sweep()
	for range 2 * logParts { // every partition emptied and reused, twice
		require.NoError(t, c.RotateLog(ctx))
		write(2)
		sweep()
	}
}

// syncTriggers decides each table's triggers under the DDL lock from what
// holds then, not from what its caller read before: a node that read the
// log as still switching, or the schema's events before another connector
// recorded new ones, must not undo what the others did since.
func TestSyncTriggersWorkingFromAStaleStateUndoesNothing(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	feed := newTestConnector(t, WithoutChangeLog())
	schema := feed.cfg.schema
	require.NoError(t, feed.Set(ctx, "t/a", 1, 1))
	newTestConnector(t, WithSchema(schema), WithChangeLog(time.Hour)) // switches the log on
	events := newTestConnector(t, WithSchema(schema), WithEvents(Insert, Delete))
	triggers := func() []string {
		tables, err := listTables(ctx, feed.pool, schema)
		require.NoError(t, err)
		require.Len(t, tables, 1)
		return tables[0].triggers
	}
	want := []string{"pgstore_log_delete", "pgstore_log_insert", "pgstore_log_lock"}
	require.Equal(t, want, triggers())

	// As a node that read the log as still switching and all five events.
	require.NoError(t, syncTriggers(ctx, events.pool, schema, allEvents, true, logStarting))
	require.Equal(t, want, triggers(), "no NOTIFY trigger back, no UPDATE trigger back")
}
