package pgstore_test

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/pgstore/pgstore"
	"github.com/pgstore/pgstore/internal/pgtest"
)

// logRetention is the retention a schema's change log records, or 0 when the
// schema has no log.
func logRetention(t *testing.T, schema string) time.Duration {
	t.Helper()
	ctx := testCtx(t)
	var exists bool
	require.NoError(t, pgtest.Pool(t).QueryRow(ctx, "SELECT to_regclass($1) IS NOT NULL", ident(schema, "pgstore/log")).Scan(&exists))
	if !exists {
		return 0
	}
	var retention time.Duration
	require.NoError(t, pgtest.Pool(t).QueryRow(ctx, "SELECT retention FROM "+ident(schema, "pgstore/log")).Scan(&retention))
	return retention
}

func TestTheChangeLogIsOnByDefault(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c, schema := connectNamed(t)
	require.Equal(t, pgstore.DefaultChangeLogRetention, logRetention(t, schema))
	require.NotNil(t, c.Stats().Log)

	got := newEventLog()
	sub, err := c.Subscribe(ctx, got.handle, pgstore.ForEvents(pgstore.Insert))
	require.NoError(t, err)
	defer sub.Close(context.Background())
	require.NoError(t, c.Set(ctx, "cars/bmw", 1, "bmw"))
	e := got.waitFor(t, 1)[0]
	require.JSONEq(t, `"bmw"`, string(e.Value), "events carry the value")
	require.NotEmpty(t, e.Cursor)
	require.Equal(t, int64(2), e.Offset, "the table's second entry, after its CREATE_TABLE")
}

func TestWithoutChangeLogIsRecordedInTheSchemaAndFollowed(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	schema := pgtest.Schema(t)
	feed := connectSchema(t, schema, pgstore.WithoutChangeLog())
	require.NoError(t, feed.Set(ctx, "t/a", 1, 1))
	require.Zero(t, logRetention(t, schema))

	// A connector that chose nothing follows the schema: no log.
	plain := connectSchema(t, schema)
	require.Nil(t, plain.Stats().Log)
	require.Zero(t, logRetention(t, schema))

	// One that asks for the log turns it on for every connector; the
	// choice can no longer be refused.
	connectSchema(t, schema, pgstore.WithChangeLog(2*time.Hour))
	require.Equal(t, 2*time.Hour, logRetention(t, schema))
	got := newEventLog()
	sub, err := plain.Subscribe(ctx, got.handle, pgstore.ForEvents(pgstore.Update))
	require.NoError(t, err)
	defer sub.Close(context.Background())
	require.NoError(t, feed.Set(ctx, "t/a", 2, 2))
	require.NotEmpty(t, got.waitFor(t, 1)[0].Cursor, "through the log")

	_, err = pgstore.Connect(ctx, pgtest.URL(t), pgstore.WithSchema(schema), pgstore.WithoutChangeLog())
	require.ErrorContains(t, err, "WithoutChangeLog")
	require.ErrorContains(t, err, "cannot be switched off")
}

func TestAConnectorWithoutTheOptionKeepsTheRetentionTheSchemaRecords(t *testing.T) {
	t.Parallel()
	schema := pgtest.Schema(t)
	connectSchema(t, schema, pgstore.WithChangeLog(3*time.Hour))
	connectSchema(t, schema)
	require.Equal(t, 3*time.Hour, logRetention(t, schema))
}

// A schema made before pgstore recorded WithoutChangeLog, and before its
// change log, gets both when a connector without options starts on it: its
// tables are brought in line, and a subscription of the NOTIFY feed is told.
func TestASchemaOfAnEarlierPgstoreGetsTheLogByDefault(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	schema := pgtest.Schema(t)
	old := connectSchema(t, schema, pgstore.WithoutChangeLog())
	require.NoError(t, old.Set(ctx, "t/a", 1, 1))
	got := newEventLog()
	sub, err := old.Subscribe(ctx, got.handle)
	require.NoError(t, err)
	defer sub.Close(context.Background())
	_, err = pgtest.Pool(t).Exec(ctx, "ALTER TABLE "+ident(schema, "pgstore/settings")+" DROP COLUMN change_log_off")
	require.NoError(t, err)

	connectSchema(t, schema)
	require.Equal(t, pgstore.DefaultChangeLogRetention, logRetention(t, schema))
	require.Equal(t, logTriggers,
		tableTriggers(t, pgtest.Pool(t), schema, "t"))
	resync := got.waitFor(t, 1)[0]
	require.Equal(t, pgstore.Resync, resync.Type)
	require.ErrorIs(t, resync.Reason, pgstore.ErrLogStarted)
}

func TestCreateSchemaMakesASchemaWhoseLogIsOn(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c := connect(t)
	schema := pgtest.Schema(t)
	require.NoError(t, c.CreateSchema(ctx, schema))
	require.Equal(t, pgstore.DefaultChangeLogRetention, logRetention(t, schema))
	report, err := pgstore.Check(ctx, pgtest.URL(t), pgstore.WithSchema(schema))
	require.NoError(t, err)
	require.True(t, report.OK(), report.String())

	off := pgtest.Schema(t)
	require.NoError(t, connect(t, pgstore.WithoutChangeLog()).CreateSchema(ctx, off))
	require.Zero(t, logRetention(t, off))
}

// Nodes started together on a schema without a log (a rolling upgrade) all
// switch it on at once: each succeeds, and the tables end with the log's
// triggers alone. (That no node gives a table back the NOTIFY triggers that
// another removed, deciding from a stale state, this test rarely meets;
// TestSyncTriggersWorkingFromAStaleStateUndoesNothing makes it happen.)
func TestConnectorsSwitchingTheLogOnTogetherLeaveOnlyTheLogsTriggers(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	schema := pgtest.Schema(t)
	feed := connectSchema(t, schema, pgstore.WithoutChangeLog())
	tables := []string{"a", "b", "c", "d", "e", "f"}
	for _, table := range tables {
		require.NoError(t, feed.Set(ctx, table+"/1", 1, 1))
	}
	const nodes = 4
	errs := make(chan error, nodes)
	for range nodes {
		go func() {
			c, err := pgstore.Connect(ctx, pgtest.URL(t), pgstore.WithSchema(schema), pgstore.WithChangeLog(time.Hour))
			if err == nil {
				err = c.Close(ctx)
			}
			errs <- err
		}()
	}
	for range nodes {
		require.NoError(t, <-errs)
	}
	for _, table := range tables {
		require.Equal(t, logTriggers,
			tableTriggers(t, pgtest.Pool(t), schema, table), "table %s", table)
	}
}

// A schema whose feed is off has nothing for a log to hold but the cost of
// its head lock: a connector without WithChangeLog makes none there. One that
// tells of tables only keeps them in a log.
func TestASchemaWithItsFeedOffGetsNoLogByDefault(t *testing.T) {
	t.Parallel()
	off, schema := connectNamed(t, pgstore.WithEvents())
	require.NoError(t, off.Set(testCtx(t), "t/a", 1, 1))
	require.Zero(t, logRetention(t, schema))
	require.Nil(t, off.Stats().Log)

	_, schema = connectNamed(t, pgstore.WithEvents(pgstore.CreateTable, pgstore.DestroyTable))
	require.Equal(t, pgstore.DefaultChangeLogRetention, logRetention(t, schema))
}
