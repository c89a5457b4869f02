package pgstore_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/pgstore/pgstore"
	"github.com/pgstore/pgstore/internal/pgtest"
)

// smallLockTable are the settings of a private server with room for a few
// hundred locks in all (max_locks_per_transaction × max_connections and PostgreSQL's own
// processes), where dropping bigSchemaTables tables in one transaction fails
// with "out of shared memory".
var smallLockTable = []string{"max_locks_per_transaction=10", "max_connections=10"}

// bigSchemaTables pgstore tables take about ten locks each to drop: some
// two thousand in one transaction.
const bigSchemaTables = 200

// connectPrivate returns a connector on the schema "big" of a private server,
// closed when the test ends, and the server's connection string.
func connectPrivate(t *testing.T, settings []string, opts ...pgstore.Option) (*pgstore.Connector, string) {
	t.Helper()
	u := pgtest.Private(t, settings...)
	return connectURL(t, withParam(t, u, "pool_max_conns", "3"), "big", opts...), u // a server of few connections
}

// createTables creates the pgstore tables t000 … t(n-1) of the connector's
// schema, each by its first write, and returns their names.
func createTables(t *testing.T, c *pgstore.Connector, n int) []string {
	t.Helper()
	ctx := testCtx(t)
	names := make([]string, n)
	for i := range names {
		names[i] = fmt.Sprintf("t%03d", i)
		require.NoError(t, c.Set(ctx, names[i]+"/x", 1, i))
	}
	return names
}

func TestDestroySchemaOfMoreTablesThanTheLockTableHoldsLeavesOtherSessionsWorking(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c, u := connectPrivate(t, smallLockTable)
	names := createTables(t, c, bigSchemaTables)
	f := subscribe(t, c, pgstore.ForEvents(pgstore.DestroyTable))
	other, err := pgx.Connect(ctx, u)
	require.NoError(t, err)
	defer other.Close(context.Background())

	destroyed := make(chan error, 1)
	go func() { destroyed <- c.DestroySchema(ctx, "big") }()
	// Meanwhile another session takes a few locks at a time (advisory
	// locks, which always take room in the shared lock table).
	for done := false; !done; {
		_, err := other.Exec(ctx, "SELECT pg_advisory_xact_lock(k) FROM generate_series(1, 20) k")
		require.NoError(t, err, "another session, while DestroySchema ran")
		select {
		case err := <-destroyed:
			require.NoError(t, err)
			done = true
		default:
		}
	}
	require.False(t, schemaExists(t, c, "big"))

	got := make([]string, len(names))
	for i := range got {
		got[i] = describe(f.next())
	}
	want := make([]string, len(names))
	for i, name := range names {
		want[i] = "DESTROY_TABLE " + name
	}
	require.ElementsMatch(t, want, got)
}

func TestDestroySchemaInStepsGivesLogSubscribersEveryDestroyTableBeforeTheLogGoes(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c, u := connectPrivate(t, smallLockTable, pgstore.WithChangeLog(time.Hour))
	names := createTables(t, c, bigSchemaTables)
	got := newEventLog()
	sub, err := c.Subscribe(ctx, got.handle)
	require.NoError(t, err)
	defer sub.Close(context.Background())

	// A session creating a table in the schema holds it: the last step,
	// which drops the schema and its log, waits for it.
	holder, err := pgx.Connect(ctx, u)
	require.NoError(t, err)
	defer holder.Close(context.Background())
	hold, err := holder.Begin(ctx)
	require.NoError(t, err)
	defer hold.Rollback(context.Background()) //nolint:errcheck
	_, err = hold.Exec(ctx, "CREATE TABLE "+ident("big", "hold")+" (x int)")
	require.NoError(t, err)

	destroyed := make(chan error, 1)
	go func() { destroyed <- c.DestroySchema(ctx, "big") }()
	events := got.waitFor(t, len(names))
	tables := make([]string, len(events))
	for i, e := range events {
		require.Equal(t, pgstore.DestroyTable, e.Type, "event %d: %+v", i, e)
		require.NotEmpty(t, e.Cursor, "from the log")
		tables[i] = e.Table
	}
	require.ElementsMatch(t, names, tables)
	select {
	case err := <-destroyed:
		t.Fatalf("DestroySchema returned (%v) while a session held its schema", err)
	default:
	}

	require.NoError(t, hold.Rollback(ctx))
	require.NoError(t, <-destroyed)
	events = got.waitFor(t, len(names)+1)
	require.Len(t, events, len(names)+1)
	require.Equal(t, pgstore.Resync, events[len(names)].Type)
	require.ErrorIs(t, events[len(names)].Reason, pgstore.ErrLogGone)
}

func TestDestroySchemaAlsoDropsATableCreatedWhileItRuns(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c, schema := connectNamed(t)
	for _, table := range []string{"a", "b", "c"} {
		require.NoError(t, c.Set(ctx, table+"/x", 1, 1))
	}
	f := subscribe(t, c, pgstore.ForEvents(pgstore.DestroyTable))
	pool := pgtest.Pool(t)

	// A reader of a holds the step that drops a, b and c.
	reader, err := pool.Begin(ctx)
	require.NoError(t, err)
	defer reader.Rollback(context.Background()) //nolint:errcheck
	_, err = reader.Exec(ctx, "SELECT FROM "+ident(schema, "a"))
	require.NoError(t, err)
	destroyed := make(chan error, 1)
	go func() { destroyed <- c.DestroySchema(ctx, schema) }()
	waitUntil(t, ctx, "the step waits for the reader", func() bool {
		return queryInt(t, c, "SELECT count(*) FROM pg_locks WHERE relation = $1::regclass AND NOT granted", ident(schema, "a")) == 1
	})

	// Another connector creates a table, as its first write to it does:
	// under the schema's DDL lock, which it gets when the step ends.
	pid := make(chan int64, 1)
	created := make(chan error, 1)
	go func() {
		created <- pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
			var p int64
			if err := tx.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&p); err != nil {
				return err
			}
			pid <- p
			if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock(hashtextextended('pgstore ' || $1, 0))", schema); err != nil {
				return err
			}
			for _, stmt := range []string{
				"CREATE TABLE " + ident(schema, "late") + ` (id text COLLATE "C" PRIMARY KEY, version bigint NOT NULL, val jsonb NOT NULL)`,
				"COMMENT ON TABLE " + ident(schema, "late") + " IS 'pgstore records'",
			} {
				if _, err := tx.Exec(ctx, stmt); err != nil {
					return err
				}
			}
			return nil
		})
	}()
	creator := <-pid
	waitUntil(t, ctx, "the creator waits for the DDL lock", func() bool {
		return queryInt(t, c, "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND wait_event_type = 'Lock'", creator) == 1
	})

	require.NoError(t, reader.Rollback(ctx))
	require.NoError(t, <-created)
	require.NoError(t, <-destroyed)
	require.False(t, schemaExists(t, c, schema))
	f.expect("DESTROY_TABLE a", "DESTROY_TABLE b", "DESTROY_TABLE c", "DESTROY_TABLE late")
}
