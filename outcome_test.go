package pgstore_test

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/pgstore/pgstore"
	"github.com/pgstore/pgstore/internal/pgtest"
)

// The faults of a partitioned network, through the test proxy: a write's
// answer lost after the server committed it, a write's bytes delayed until
// after later writes, a server that cannot be reached at all.

// connectThroughProxy returns a connector whose pool goes through a proxy, with attempts bounded at 300 ms so that a lost answer
// is noticed quickly, and its schema. Two warm-up writes leave every
// statement of a batch prepared, so that a batch later goes out in one
// piece.
func connectThroughProxy(t *testing.T, opts ...pgstore.Option) (*pgstore.Connector, *pgtest.Proxy, string) {
	t.Helper()
	ctx := testCtx(t)
	proxy, url := pgtest.NewProxy(t)
	schema := pgtest.Schema(t)
	opts = append([]pgstore.Option{pgstore.WithSchema(schema), pgstore.WithLogger(testLogger(t)),
		pgstore.WithMinAttempt(300 * time.Millisecond), pgstore.WithRetryTimeout(3 * time.Second)}, opts...)
	c, err := pgstore.Connect(ctx, withParam(t, url, "pool_max_conns", "2"), opts...)
	require.NoError(t, err)
	t.Cleanup(func() {
		proxy.Restore()
		proxy.Release()
		_ = c.Close(context.Background())
	})
	require.NoError(t, c.Set(ctx, "k/warm", 1, "up"))
	require.NoError(t, c.Set(ctx, "k/warm", 2, "up"))
	return c, proxy, schema
}

// waitForRow polls the server directly until the row of key table/id holds
// version.
func waitForRow(t *testing.T, db *pgstore.Connector, schema, table, id string, version int64) {
	t.Helper()
	waitUntil(t, testCtx(t), fmt.Sprintf("%s/%s reaches version %d on the server", table, id, version), func() bool {
		v, _, found := storedRow(t, db, schema, table, id)
		return found && v == version
	})
}

func TestABatchDelayedOnTheNetworkNeverOverwritesALaterWrite(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c, proxy, schema := connectThroughProxy(t)
	direct := connectSchema(t, schema)

	// The partition strands the bytes of the batch of version 1 on their
	// way to the server; new connections get through.
	proxy.HoldRequests()
	first := c.SetAsync(ctx, "k/x", 1, "one")
	require.NoError(t, first.Wait(ctx), "the stranded attempt is fenced, found not committed, and written again")
	require.NoError(t, c.Set(ctx, "k/x", 2, "two"))
	requireRecord(t, c, "k/x", 2, `"two"`)

	// The stranded bytes arrive at last: their backend is gone.
	proxy.Release()
	proxy.Settle()
	requireRecord(t, direct, "k/x", 2, `"two"`)
}

func TestACommittedBatchWhoseAnswerIsLostIsReportedCommittedAndNotAppliedAgain(t *testing.T) {
	t.Parallel()
	for _, guard := range []bool{false, true} {
		t.Run(fmt.Sprintf("version guard %v", guard), func(t *testing.T) {
			t.Parallel()
			ctx := testCtx(t)
			// Both writes in one batch, the one whose answer is lost: a
			// write interval gathers them.
			c, proxy, schema := connectThroughProxy(t, pgstore.WithVersionGuard(guard), pgstore.WithWriteInterval(50*time.Millisecond))
			other := connectSchema(t, schema, pgstore.WithVersionGuard(guard))
			require.NoError(t, other.Set(ctx, "k/refused", 10, "newer"))

			proxy.HoldReplies()
			mine := c.SetAsync(ctx, "k/x", 5, "mine")
			old := c.SetAsync(ctx, "k/refused", 3, "older")
			waitForRow(t, other, schema, "k", "x", 5) // committed; the answer is held
			// Another node writes the same key before the answer is missed.
			require.NoError(t, other.Set(ctx, "k/x", 6, "other's"))

			require.NoError(t, mine.Wait(ctx), "it did commit")
			if guard {
				err := old.Wait(ctx)
				require.ErrorIs(t, err, pgstore.ErrVersionConflict, "the guard refused it in the committed batch")
				var conflict *pgstore.VersionConflictError
				require.ErrorAs(t, err, &conflict)
				require.Equal(t, int64(10), conflict.Stored, "read back with what the guard refused")
				requireRecord(t, other, "k/refused", 10, `"newer"`)
			} else {
				require.NoError(t, old.Wait(ctx))
			}
			requireRecord(t, other, "k/x", 6, `"other's"`) // not re-applied over the newer write
		})
	}
}

func TestAWriteWhoseAnswerIsLostAndServerUnreachableFailsAsOutcomeUnknown(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c, proxy, schema := connectThroughProxy(t, pgstore.WithRetryTimeout(time.Second))
	direct := connectSchema(t, schema)

	proxy.HoldReplies()
	proxy.Refuse()
	r := c.SetAsync(ctx, "k/x", 1, "sent")
	waitForRow(t, direct, schema, "k", "x", 1)
	err := r.Wait(ctx)
	require.ErrorIs(t, err, pgstore.ErrOutcomeUnknown, "the commit was sent and nobody could be asked")

	// Once the network heals (the pool's idle connections answer again,
	// and new ones pass), the next write fences the old attempt first, and
	// goes through.
	proxy.Restore()
	proxy.Release()
	require.NoError(t, c.Set(ctx, "k/x", 2, "after"))
	requireRecord(t, direct, "k/x", 2, `"after"`)
}

func TestARefusedConnectionNeverSaysTheWriteMayHaveCommitted(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	proxy, url := pgtest.NewProxy(t)
	pool, err := pgxpool.New(ctx, url)
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	c := newOnPool(t, pool, pgstore.WithRetryTimeout(500*time.Millisecond), pgstore.WithMinAttempt(100*time.Millisecond))
	require.NoError(t, c.Set(ctx, "k/x", 1, "before"))
	proxy.Cut()
	pool.Reset() // no connection left open: every attempt must connect
	err = c.Set(ctx, "k/x", 2, "never sent")
	require.Error(t, err)
	require.NotErrorIs(t, err, pgstore.ErrOutcomeUnknown)
	require.ErrorContains(t, err, "write failed after")
	proxy.Restore()
}

func TestAWritesDeadlineCountsFromAcceptanceNotPerQueuedBatch(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	fp := newFailingPool(t)
	const timeout = 300 * time.Millisecond
	c := newOnPool(t, fp.pool, pgstore.WithRetryTimeout(timeout), pgstore.WithMaxBatchSize(1),
		pgstore.WithMinAttempt(100*time.Millisecond))

	fp.failing.Store(true)
	began := time.Now()
	var results []*pgstore.Result
	for i := range 8 {
		results = append(results, c.SetAsync(ctx, fmt.Sprintf("d/%d", i), 1, i)) // eight one-write batches
	}
	for i, r := range results {
		err := r.Wait(ctx)
		require.ErrorIs(t, err, errServerGone, "write %d", i)
		require.NotErrorIs(t, err, pgstore.ErrOutcomeUnknown, "write %d was never sent", i)
	}
	took := time.Since(began)
	attempts := fp.calls.Load()
	fp.failing.Store(false)
	t.Logf("8 queued one-write batches, retry timeout %v: the last failed after %v, in %d attempts in all", timeout, took, attempts)
	// The first batch retries until the deadline; the ones queued behind it
	// are past theirs by then and fail with its cause, without a wait of
	// their own. Each spending its own budget made 8 batches take 8 times
	// as many attempts.
	require.Less(t, attempts, int64(12), "batches queued behind a failing one do not each retry")
	last := results[7].Wait(ctx)
	require.ErrorContains(t, last, "write not sent")
	require.Equal(t, 1, strings.Count(last.Error(), "pgstore:"), "%q names pgstore once", last)
}

func TestABatchTheServerTimesOutIsHalvedUntilItPasses(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	schema := pgtest.Schema(t)
	setup := connectSchema(t, schema)
	require.NoError(t, setup.Set(ctx, "slow/0", 0, 0))
	// Every row costs the server 1 ms, and a statement may take 40 ms.
	admin := pgtest.Pool(t)
	_, err := admin.Exec(ctx, `CREATE FUNCTION `+ident(schema, "slow_row")+`() RETURNS trigger LANGUAGE plpgsql AS
		$$ BEGIN PERFORM pg_sleep(0.001); RETURN NEW; END $$`)
	require.NoError(t, err)
	_, err = admin.Exec(ctx, `CREATE TRIGGER slow BEFORE INSERT OR UPDATE ON `+ident(schema, "slow")+
		` FOR EACH ROW EXECUTE FUNCTION `+ident(schema, "slow_row")+`()`)
	require.NoError(t, err)

	// The timeout holds for the flushes, not for Connect's catalogue
	// queries, which a machine busy with the other tests can slow past it.
	cfg, err := pgxpool.ParseConfig(pgtest.URL(t))
	require.NoError(t, err)
	var flushing atomic.Bool
	cfg.PrepareConn = func(ctx context.Context, conn *pgx.Conn) (bool, error) {
		if !flushing.Load() {
			return true, nil
		}
		_, err := conn.Exec(ctx, "SET statement_timeout = '40ms'")
		return err == nil, err
	}
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	c, err := pgstore.New(ctx, pool, pgstore.WithSchema(schema), pgstore.WithLogger(testLogger(t)), pgstore.WithWriteInterval(time.Hour))
	require.NoError(t, err)
	flushing.Store(true)
	results := setMany(ctx, c, "slow", 400) // one batch of 400 rows: 400 ms
	require.NoError(t, c.Close(ctx))
	for i, r := range results {
		require.NoError(t, r.Wait(ctx), "write %d", i)
	}
	require.EqualValues(t, 400, rowCount(t, setup, schema, "slow"))
}

func TestNodesSettingWhatOthersDeleteDoNotDeadlock(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	schema := pgtest.Schema(t)
	var logs syncBuffer
	const n = 300
	// A batch of n is full, and goes out at once.
	opts := []pgstore.Option{pgstore.WithLogger(slog.New(slog.NewTextHandler(&logs, nil))),
		pgstore.WithWriteInterval(time.Hour), pgstore.WithMaxBatchSize(n)}
	setter, deleter := connectSchema(t, schema, opts...), connectSchema(t, schema, opts...)
	for round := range 10 {
		// Each node sets half of the keys and deletes the other half, and
		// the other node the reverse, so both lock every key.
		var results []*pgstore.Result
		for i := range n {
			key := fmt.Sprintf("mixed/%04d", i)
			if i%2 == round%2 {
				results = append(results, setter.SetAsync(ctx, key, int64(round), i), deleter.DeleteAsync(ctx, key))
			} else {
				results = append(results, setter.DeleteAsync(ctx, key), deleter.SetAsync(ctx, key, int64(round), i))
			}
		}
		waitAll(t, results)
	}
	require.NotContains(t, logs.String(), "40P01", "a deadlock was detected")
	require.NotContains(t, logs.String(), "deadlock")
}

func TestCloseEndsABatchWhoseOutcomeItGaveUpOnSoItCannotCommitLater(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	schema := pgtest.Schema(t)
	c, err := pgstore.Connect(ctx, pgtest.URL(t), pgstore.WithSchema(schema), pgstore.WithLogger(testLogger(t)))
	require.NoError(t, err)
	require.NoError(t, c.Set(ctx, "k/x", 1, "one"))

	// Another session holds the row: the next batch waits for it.
	admin := pgtest.Pool(t)
	tx, err := admin.Begin(ctx)
	require.NoError(t, err)
	defer tx.Rollback(ctx) //nolint:errcheck
	_, err = tx.Exec(ctx, "SELECT FROM "+ident(schema, "k")+" WHERE id = 'x' FOR UPDATE")
	require.NoError(t, err)
	r := c.SetAsync(ctx, "k/x", 2, "two")
	waitUntil(t, ctx, "the batch waits for the row", func() bool {
		var waiting int
		require.NoError(t, admin.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity
			WHERE wait_event_type = 'Lock' AND query LIKE '%'||$1||'%'`, schema).Scan(&waiting))
		return waiting > 0
	})

	short, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel()
	require.Error(t, c.Close(short))
	require.ErrorIs(t, r.Wait(ctx), pgstore.ErrOutcomeUnknown, "sent, and Close's context ended before the answer")

	// Once the row is free, the batch has nobody left to commit it.
	require.NoError(t, tx.Commit(ctx))
	direct := connectSchema(t, schema)
	requireRecord(t, direct, "k/x", 1, `"one"`)
}

func TestWritesGoOnWhenPgstoresCommitMarkersAreDroppedBehindItsBack(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c, schema := connectNamed(t)
	require.NoError(t, c.Set(ctx, "k/x", 1, "one"))
	_, err := pgtest.Pool(t).Exec(ctx, "DROP TABLE "+ident(schema, "pgstore/commits"))
	require.NoError(t, err)
	require.NoError(t, c.Set(ctx, "k/x", 2, "two"), "the markers are made again")
	requireRecord(t, c, "k/x", 2, `"two"`)
}

// Every batch leaves its commit marker behind, and later batches delete them
// in groups: however many batches a connector writes, its markers stay a few
// dozen rows, and Close deletes those it leaves.
func TestCommitMarkersStayBoundedHoweverManyBatches(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	count := func(schema, table string) int64 {
		var n int64
		require.NoError(t, pgtest.Pool(t).QueryRow(ctx, "SELECT count(*) FROM "+ident(schema, table)).Scan(&n))
		return n
	}
	for _, guard := range []bool{false, true} {
		schema := pgtest.Schema(t)
		c := connectSchema(t, schema, pgstore.WithWriteInterval(0), pgstore.WithVersionGuard(guard))
		for i := range 200 {
			require.NoError(t, c.Set(ctx, "k/x", int64(i+1), i))
		}
		if guard {
			require.Error(t, c.Set(ctx, "k/x", 1, "stale"), "refused, and recorded under its batch's token")
			require.Positive(t, count(schema, "pgstore/refused"))
		}
		require.LessOrEqual(t, count(schema, "pgstore/commits"), int64(40), "200 one-write batches")
		require.Positive(t, count(schema, "pgstore/commits"), "the last batches' markers are kept until enough gather")
		closeNow(t, c)
		require.Zero(t, count(schema, "pgstore/commits"), "Close deletes what the batches left")
		require.Zero(t, count(schema, "pgstore/refused"))
	}
}

// A connector that destroyed its schema closes without a word about the
// markers it would have deleted: they went with the schema.
func TestCloseAfterDestroySchemaWarnsOfNothing(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	var logs bytes.Buffer
	c := connectSchema(t, pgtest.Schema(t), pgstore.WithLogger(slog.New(slog.NewTextHandler(&logs, nil))))
	require.NoError(t, c.Set(ctx, "k/x", 1, "one"))
	require.NoError(t, c.DestroySchema(ctx, c.Schema()))
	closeNow(t, c)
	require.Empty(t, logs.String())
}
