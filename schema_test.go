package pgstore_test

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/pgstore/pgstore"
	"github.com/pgstore/pgstore/internal/pgtest"
)

// notifyFunction is the trigger function pgstore installs in each schema it
// prepares.
const notifyFunction = "pgstore_notify_v1"

// schemaExists reports whether a schema of exactly that name exists.
func schemaExists(t testing.TB, c *pgstore.Connector, schema string) bool {
	t.Helper()
	return queryInt(t, c, "SELECT count(*) FROM pg_namespace WHERE nspname = $1", schema) == 1
}

// functionsIn counts pgstore's trigger functions in a schema.
func functionsIn(t testing.TB, c *pgstore.Connector, schema string) int64 {
	t.Helper()
	return queryInt(t, c, `SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
		WHERE n.nspname = $1 AND p.proname = $2`, schema, notifyFunction)
}

// execAll runs statements on the connector's pool, failing the test on error.
func execAll(t testing.TB, c *pgstore.Connector, stmts ...string) {
	t.Helper()
	for _, stmt := range stmts {
		_, err := c.Exec(testCtx(t), stmt)
		require.NoError(t, err, stmt)
	}
}

// handmadeTables creates, in schema, a table of another shape and one shaped
// like a record table, both without pgstore's comment.
func handmadeTables(t testing.TB, c *pgstore.Connector, schema string) {
	t.Helper()
	execAll(t, c,
		"CREATE TABLE "+ident(schema, "handmade")+" (x int)",
		"INSERT INTO "+ident(schema, "handmade")+" VALUES (1), (2)",
		"CREATE TABLE "+ident(schema, "lookalike")+" (id text PRIMARY KEY, version bigint NOT NULL, val jsonb NOT NULL)",
		"INSERT INTO "+ident(schema, "lookalike")+` VALUES ('a', 1, '1')`,
	)
}

// analyze runs ANALYZE on each named table of a schema, as autovacuum would
// sooner or later.
func analyze(t testing.TB, c *pgstore.Connector, schema string, tables ...string) {
	t.Helper()
	for _, table := range tables {
		execAll(t, c, "ANALYZE "+ident(schema, table))
	}
}

// ---- GetSchemaOverview ----

func TestSchemaOverviewCountsTheRecordsOfEachTableExactly(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c := connect(t)

	for _, id := range []string{"bmw", "vw", "audi"} {
		require.NoError(t, c.Set(ctx, "cars/"+id, 1, id))
	}
	require.NoError(t, c.Set(ctx, "bikes/bmx", 1, "bmx"))
	require.NoError(t, c.Set(ctx, "cars/bmw", 2, "bmw again")) // an update adds no record
	// A table emptied by deletes is still there, with no records.
	require.NoError(t, c.Set(ctx, "planes/a380", 1, "a380"))
	require.NoError(t, c.Delete(ctx, "planes/a380"))

	overview, err := c.GetSchemaOverview(ctx)
	require.NoError(t, err)
	require.Equal(t, map[string]int64{"cars": 3, "bikes": 1, "planes": 0}, overview)
}

func TestSchemaOverviewLeavesOutWritesStillBuffered(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c, schema := connectNamed(t)
	require.NoError(t, c.Set(ctx, "cars/bmw", 1, "bmw"))

	// An hour's interval keeps a lone write buffered until Close.
	slow := connectSchema(t, schema, pgstore.WithWriteInterval(time.Hour))
	late := slow.SetAsync(ctx, "cars/vw", 1, "vw")
	lateTable := slow.SetAsync(ctx, "bikes/bmx", 1, "bmx")
	overview, err := c.GetSchemaOverview(ctx)
	require.NoError(t, err)
	require.Equal(t, map[string]int64{"cars": 1}, overview, "buffered writes are not counted")

	closeNow(t, slow) // flushes
	waitAll(t, []*pgstore.Result{late, lateTable})
	overview, err = c.GetSchemaOverview(ctx)
	require.NoError(t, err)
	require.Equal(t, map[string]int64{"cars": 2, "bikes": 1}, overview)
}

func TestSchemaOverviewLeavesOutTablesMadeByHand(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c, schema := connectNamed(t)
	require.NoError(t, c.Set(ctx, "cars/bmw", 1, "bmw"))
	handmadeTables(t, c, schema)

	for _, estimate := range []bool{false, true} {
		overview, err := c.GetSchemaOverviewOf(ctx, schema, estimate)
		require.NoError(t, err)
		require.Equal(t, []string{"cars"}, keys(overview), "estimate=%v", estimate)
	}
}

func TestSchemaOverviewOfAnEmptyOrMissingSchemaIsAnEmptyMap(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c := connect(t) // Connect created the schema, with no tables yet

	overview, err := c.GetSchemaOverview(ctx)
	require.NoError(t, err)
	require.NotNil(t, overview)
	require.Empty(t, overview)

	for _, estimate := range []bool{false, true} {
		overview, err = c.GetSchemaOverviewOf(ctx, "no_such_schema_xyz", estimate)
		require.NoError(t, err, "a missing schema has no tables; it is no error (estimate=%v)", estimate)
		require.NotNil(t, overview)
		require.Empty(t, overview)
	}
}

func TestSchemaOverviewOfAnotherConnectorsSchema(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c := connect(t)
	require.NoError(t, c.Set(ctx, "mine/a", 1, "a"))
	other, otherSchema := connectNamed(t)
	require.NoError(t, other.Set(ctx, "theirs/a", 1, "a"))
	require.NoError(t, other.Set(ctx, "theirs/b", 1, "b"))

	overview, err := c.GetSchemaOverviewOf(ctx, otherSchema, false)
	require.NoError(t, err)
	require.Equal(t, map[string]int64{"theirs": 2}, overview)
	overview, err = c.GetSchemaOverview(ctx)
	require.NoError(t, err)
	require.Equal(t, map[string]int64{"mine": 1}, overview)
}

// Estimates come from pg_class.reltuples. Since PostgreSQL 14 a table that
// was never vacuumed or analysed has reltuples -1 ("unknown"), whatever it
// holds; PostgreSQL 15 keeps -1 through inserts (autovacuum analyses a table
// only after 50 changes), and ANALYZE of an empty table gives 0. On
// PostgreSQL 13 and older the estimate of such a table is 0 instead.
func TestSchemaOverviewEstimateIsMinusOneUntilAnalysedThenExactForSmallTables(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c, schema := connectNamed(t)
	for _, id := range []string{"bmw", "vw", "audi"} {
		require.NoError(t, c.Set(ctx, "cars/"+id, 1, id))
	}
	require.NoError(t, c.Set(ctx, "bikes/bmx", 1, "bmx"))
	require.NoError(t, c.Set(ctx, "planes/a380", 1, "a380"))
	require.NoError(t, c.Delete(ctx, "planes/a380"))

	estimate, err := c.GetSchemaOverviewOf(ctx, schema, true)
	require.NoError(t, err)
	require.Equal(t, map[string]int64{"cars": -1, "bikes": -1, "planes": -1}, estimate,
		"tables never analysed have no estimate yet")

	analyze(t, c, schema, "cars", "bikes", "planes")
	estimate, err = c.GetSchemaOverviewOf(ctx, schema, true)
	require.NoError(t, err)
	exact, err := c.GetSchemaOverviewOf(ctx, schema, false)
	require.NoError(t, err)
	require.Equal(t, map[string]int64{"cars": 3, "bikes": 1, "planes": 0}, exact)
	require.Equal(t, exact, estimate, "ANALYZE reads every row of a small table")

	// The estimate is of the last ANALYZE: newer writes show only in exact counts.
	require.NoError(t, c.Set(ctx, "cars/trabant", 1, "trabant"))
	estimate, err = c.GetSchemaOverviewOf(ctx, schema, true)
	require.NoError(t, err)
	require.EqualValues(t, 3, estimate["cars"])
	exact, err = c.GetSchemaOverview(ctx)
	require.NoError(t, err)
	require.EqualValues(t, 4, exact["cars"])
}

func TestSchemaOverviewCountsTablesWhoseNamesNeedQuoting(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c, schema := connectNamed(t)
	tables := []string{`Odd "Table"`, "UPPER", "upper", "semi;colon", `back\slash`, "a.b"}
	want := make(map[string]int64)
	for i, table := range tables {
		for j := 0; j <= i; j++ {
			require.NoError(t, c.Set(ctx, table+"/x"+strings.Repeat("y", j), 1, j))
		}
		want[table] = int64(i + 1)
	}

	exact, err := c.GetSchemaOverview(ctx)
	require.NoError(t, err)
	require.Equal(t, want, exact)

	analyze(t, c, schema, tables...)
	estimate, err := c.GetSchemaOverviewOf(ctx, schema, true)
	require.NoError(t, err)
	require.Equal(t, want, estimate)
}

func TestSchemaOverviewOfAMixedCaseSchema(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	schema := `Mixed "Case" ` + pgtest.Schema(t)
	t.Cleanup(func() { pgtest.DropSchema(t, pgtest.URL(t), schema) })
	c := connectSchema(t, schema)
	require.NoError(t, c.Set(ctx, "cars/bmw", 1, "bmw"))

	overview, err := c.GetSchemaOverview(ctx)
	require.NoError(t, err)
	require.Equal(t, map[string]int64{"cars": 1}, overview)
	// The lower-case spelling is another schema, which does not exist.
	overview, err = c.GetSchemaOverviewOf(ctx, strings.ToLower(schema), false)
	require.NoError(t, err)
	require.Empty(t, overview)
}

func TestSchemaOverviewRefusesABadSchemaName(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c := connect(t)
	_, err := c.GetSchemaOverviewOf(ctx, "", false)
	require.ErrorContains(t, err, "schema name is empty")
	_, err = c.GetSchemaOverviewOf(ctx, strings.Repeat("s", 64), true)
	require.ErrorContains(t, err, "over PostgreSQL's limit of 63")
}

// ---- CreateSchema ----

func TestCreateSchemaCreatesTheSchemaWithTheTriggerFunctionOnce(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c := connect(t)
	created := pgtest.Schema(t)
	require.False(t, schemaExists(t, c, created))

	require.NoError(t, c.CreateSchema(ctx, created))
	require.True(t, schemaExists(t, c, created))
	require.EqualValues(t, 1, functionsIn(t, c, created), "the trigger function is in the new schema")
	require.Zero(t, functionsIn(t, c, "public"), "and not in public")

	require.NoError(t, c.CreateSchema(ctx, created), "creating it again is fine")
	require.EqualValues(t, 1, functionsIn(t, c, created))

	// A connector on the schema uses it as it is.
	other := connectSchema(t, created)
	require.NoError(t, other.Set(ctx, "cars/bmw", 1, "bmw"))
	requireRecord(t, other, "cars/bmw", 1, `"bmw"`)
}

func TestCreateSchemaCompletesASchemaMadeByHand(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c := connect(t)
	handmade := pgtest.Schema(t)
	execAll(t, c, "CREATE SCHEMA "+pgx.Identifier{handmade}.Sanitize())
	require.Zero(t, functionsIn(t, c, handmade))

	require.NoError(t, c.CreateSchema(ctx, handmade))
	require.EqualValues(t, 1, functionsIn(t, c, handmade))
}

func TestCreateSchemaUsesTheNameExactlyAsGiven(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c := connect(t)
	base := pgtest.Schema(t) // for a unique suffix only
	for _, name := range []string{
		`Tenant "A" ` + base,
		base + strings.Repeat("x", 63-len(base)), // the longest PostgreSQL keeps
	} {
		t.Cleanup(func() { pgtest.DropSchema(t, pgtest.URL(t), name) })
		require.NoError(t, c.CreateSchema(ctx, name))
		require.True(t, schemaExists(t, c, name), "schema %q", name)
		require.EqualValues(t, 1, functionsIn(t, c, name))
	}
}

func TestCreateSchemaRefusesBadNames(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c := connect(t)
	base := pgtest.Schema(t)
	long := base + strings.Repeat("x", 64-len(base))

	err := c.CreateSchema(ctx, "")
	require.ErrorContains(t, err, "CreateSchema")
	require.ErrorContains(t, err, "schema name is empty")

	err = c.CreateSchema(ctx, long)
	require.ErrorContains(t, err, "64 bytes, over PostgreSQL's limit of 63")
	require.False(t, schemaExists(t, c, long[:63]), "nothing was created under the truncated name")
}

// ---- DestroySchema ----

func TestDestroySchemaDropsTheSchemaWithItsTables(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c := connect(t)
	other, otherSchema := connectNamed(t)
	require.NoError(t, other.Set(ctx, "cars/bmw", 1, "bmw"))
	require.NoError(t, other.Set(ctx, "bikes/bmx", 1, "bmx"))
	handmadeTables(t, c, otherSchema)
	f := subscribe(t, c, pgstore.ForSchema(otherSchema))

	require.NoError(t, c.DestroySchema(ctx, otherSchema))
	require.False(t, schemaExists(t, c, otherSchema))
	require.Zero(t, queryInt(t, c, "SELECT count(*) FROM pg_tables WHERE schemaname = $1 AND tablename NOT LIKE 'pgstore/%'", otherSchema),
		"pgstore's tables and the hand-made ones are gone")
	require.ElementsMatch(t, []string{"DESTROY_TABLE bikes", "DESTROY_TABLE cars"}, []string{describe(f.next()), describe(f.next())})
	resync := f.next()
	require.Equal(t, pgstore.Resync, resync.Type, "the end of the schema's change log")
	require.ErrorIs(t, resync.Reason, pgstore.ErrLogGone)

	// The other connector's next write creates its schema again, with a
	// new log that the subscription follows, and no DESTROY_TABLE came for
	// the hand-made tables.
	require.NoError(t, other.Set(ctx, "cars/vw", 1, "vw"))
	f.expect("CREATE_TABLE cars", "INSERT cars/vw@1")
	requireRecord(t, other, "cars/vw", 1, `"vw"`)
	requireNotFound(t, other, "cars/bmw")
}

func TestDestroySchemaOfAMissingSchemaIsErrSchemaNotFound(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c := connect(t)
	missing := pgtest.Schema(t)
	err := c.DestroySchema(ctx, missing)
	require.ErrorIs(t, err, pgstore.ErrSchemaNotFound)
	require.ErrorContains(t, err, missing)

	require.NoError(t, c.CreateSchema(ctx, missing))
	require.NoError(t, c.DestroySchema(ctx, missing))
	require.ErrorIs(t, c.DestroySchema(ctx, missing), pgstore.ErrSchemaNotFound, "a second destroy finds nothing")
}

func TestDestroySchemaRefusesPostgreSQLsOwnSchemas(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c := connect(t)
	publicTables := queryInt(t, c, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
	for _, name := range []string{"public", "pg_catalog", "information_schema", "pg_toast", "pg_anything"} {
		err := c.DestroySchema(ctx, name)
		require.ErrorContains(t, err, `refusing to drop the system schema "`+name+`"`)
		require.NotErrorIs(t, err, pgstore.ErrSchemaNotFound, "refused before looking: %s", name)
	}
	require.True(t, schemaExists(t, c, "public"))
	require.True(t, schemaExists(t, c, "pg_catalog"))
	require.True(t, schemaExists(t, c, "information_schema"))
	require.Equal(t, publicTables, queryInt(t, c, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"))

	require.ErrorContains(t, c.DestroySchema(ctx, ""), "schema name is empty")
	require.ErrorContains(t, c.DestroySchema(ctx, strings.Repeat("s", 64)), "over PostgreSQL's limit of 63")
}

func TestDestroyingTheConnectorsOwnSchemaThenWritingCreatesItAgain(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c, schema := connectNamed(t)
	require.NoError(t, c.Set(ctx, "cars/bmw", 1, "bmw"))

	require.NoError(t, c.DestroySchema(ctx, schema))
	require.False(t, schemaExists(t, c, schema))
	requireNotFound(t, c, "cars/bmw")
	overview, err := c.GetSchemaOverview(ctx)
	require.NoError(t, err)
	require.Empty(t, overview)

	require.NoError(t, c.Set(ctx, "cars/vw", 1, "vw"))
	requireRecord(t, c, "cars/vw", 1, `"vw"`)
	require.True(t, tableExists(t, c, schema, "cars"))
	require.EqualValues(t, 1, functionsIn(t, c, schema))
	overview, err = c.GetSchemaOverview(ctx)
	require.NoError(t, err)
	require.Equal(t, map[string]int64{"cars": 1}, overview)

	// The recreated table has its triggers again.
	f := subscribe(t, c)
	require.NoError(t, c.Set(ctx, "cars/vw", 2, "vw"))
	f.expect("UPDATE cars/vw@2")
}

// ---- DropTable ----

func TestDropTableDropsTheTableAndAnnouncesIt(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c, schema := connectNamed(t)
	require.NoError(t, c.Set(ctx, "cars/bmw", 1, "bmw"))
	require.NoError(t, c.Set(ctx, "bikes/bmx", 1, "bmx"))
	f := subscribe(t, c)

	require.NoError(t, c.DropTable(ctx, "bikes"))
	f.expect("DESTROY_TABLE bikes")
	require.False(t, tableExists(t, c, schema, "bikes"))
	require.True(t, tableExists(t, c, schema, "cars"), "other tables stay")
	requireNotFound(t, c, "bikes/bmx")
	overview, err := c.GetSchemaOverview(ctx)
	require.NoError(t, err)
	require.Equal(t, map[string]int64{"cars": 1}, overview)

	// Writing again creates the table again, announced as new.
	require.NoError(t, c.Set(ctx, "bikes/bmx", 2, "bmx again"))
	f.expect("CREATE_TABLE bikes", "INSERT bikes/bmx@2")
	requireRecord(t, c, "bikes/bmx", 2, `"bmx again"`)
	require.True(t, tableExists(t, c, schema, "bikes"))
}

func TestDropTableAnnouncesNothingWhenDestroyTableIsSwitchedOff(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c, schema := connectNamed(t, pgstore.WithEvents(pgstore.Insert))
	require.NoError(t, c.Set(ctx, "cars/bmw", 1, "bmw"))
	require.NoError(t, c.Set(ctx, "bikes/bmx", 1, "bmx"))
	f := subscribe(t, c)

	require.NoError(t, c.DropTable(ctx, "bikes"))
	require.False(t, tableExists(t, c, schema, "bikes"))
	f.noneBefore(c, "cars/marker")
}

func TestDropTableOfAMissingTableIsErrTableNotFound(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c := connect(t)
	err := c.DropTable(ctx, "nothing")
	require.ErrorIs(t, err, pgstore.ErrTableNotFound)
	require.ErrorContains(t, err, `"nothing"`)

	require.NoError(t, c.Set(ctx, "cars/bmw", 1, "bmw"))
	require.NoError(t, c.DropTable(ctx, "cars"))
	require.ErrorIs(t, c.DropTable(ctx, "cars"), pgstore.ErrTableNotFound, "a second drop finds nothing")

	require.ErrorContains(t, c.DropTable(ctx, ""), "table name is empty")
	require.ErrorContains(t, c.DropTable(ctx, strings.Repeat("t", 64)), "over PostgreSQL's limit of 63")
}

func TestDropTableLeavesTablesMadeByHandAlone(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c, schema := connectNamed(t)
	handmadeTables(t, c, schema)

	for _, table := range []string{"handmade", "lookalike"} {
		require.ErrorIs(t, c.DropTable(ctx, table), pgstore.ErrTableNotFound, table)
		require.True(t, tableExists(t, c, schema, table), "%s is still there", table)
	}
	require.EqualValues(t, 2, rowCount(t, c, schema, "handmade"))
	require.EqualValues(t, 1, rowCount(t, c, schema, "lookalike"))
}

func TestDropTableWithWritesStillBufferedCreatesItAgainOnFlush(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	schema := pgtest.Schema(t)
	c := connectSchema(t, schema)
	require.NoError(t, c.Set(ctx, "cars/bmw", 1, "bmw"))

	// An hour's interval holds a write until its batch of two is full, or
	// until Close.
	slow := connectSchema(t, schema, pgstore.WithWriteInterval(time.Hour), pgstore.WithMaxBatchSize(2))
	waitAll(t, []*pgstore.Result{slow.SetAsync(ctx, "cars/audi", 1, "audi"), slow.SetAsync(ctx, "cars/opel", 1, "opel")})
	late := slow.SetAsync(ctx, "cars/vw", 1, "vw")
	require.NoError(t, slow.DropTable(ctx, "cars"))
	require.False(t, tableExists(t, c, schema, "cars"))
	closeNow(t, slow) // flushes the buffered write

	require.NoError(t, late.Wait(ctx))
	requireRecord(t, c, "cars/vw", 1, `"vw"`)
	requireNotFound(t, c, "cars/bmw")
	requireNotFound(t, c, "cars/audi")
	requireNotFound(t, c, "cars/opel")
}

// ---- Query, Exec, Schema ----

func TestQueryAndExecRunOnTheConnectorsPool(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c, schema := connectNamed(t)

	tag, err := c.Exec(ctx, "CREATE TABLE "+ident(schema, "notes")+" (n int, s text)")
	require.NoError(t, err)
	require.Equal(t, "CREATE TABLE", tag.String())
	tag, err = c.Exec(ctx, "INSERT INTO "+ident(schema, "notes")+" SELECT g, $1 || g FROM generate_series(1, $2::int) g", "note ", 3)
	require.NoError(t, err)
	require.Equal(t, "INSERT 0 3", tag.String())
	require.EqualValues(t, 3, tag.RowsAffected())
	require.True(t, tag.Insert())

	rows, err := c.Query(ctx, "SELECT n, s FROM "+ident(schema, "notes")+" WHERE n >= $1 ORDER BY n", 2)
	require.NoError(t, err)
	type note struct {
		N int
		S string
	}
	got, err := pgx.CollectRows(rows, pgx.RowToStructByPos[note])
	require.NoError(t, err)
	require.Equal(t, []note{{2, "note 2"}, {3, "note 3"}}, got)

	// Records are rows too.
	require.NoError(t, c.Set(ctx, "cars/bmw", 1, map[string]int{"hp": 300}))
	rows, err = c.Query(ctx, "SELECT id FROM "+ident(schema, "cars")+" WHERE (val->>'hp')::int > $1", 200)
	require.NoError(t, err)
	ids, err := pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	require.Equal(t, []string{"bmw"}, ids)

	// A statement the server refuses returns the server's error.
	_, err = c.Exec(ctx, "SELECT * FROM "+ident(schema, "no_such_table"))
	require.ErrorContains(t, err, "42P01")
}

func TestSchemaAndTableCallsAfterCloseReturnErrClosed(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c, schema := connectNamed(t)
	require.NoError(t, c.Set(ctx, "cars/bmw", 1, "bmw"))
	closeNow(t, c)

	rows, err := c.Query(ctx, "SELECT $1::int", 1)
	require.ErrorIs(t, err, pgstore.ErrClosed)
	require.Nil(t, rows)
	_, err = c.Exec(ctx, "SELECT 1")
	require.ErrorIs(t, err, pgstore.ErrClosed)
	_, err = c.GetSchemaOverview(ctx)
	require.ErrorIs(t, err, pgstore.ErrClosed)
	_, err = c.GetSchemaOverviewOf(ctx, schema, true)
	require.ErrorIs(t, err, pgstore.ErrClosed)
	require.ErrorIs(t, c.CreateSchema(ctx, schema), pgstore.ErrClosed)
	require.ErrorIs(t, c.DestroySchema(ctx, schema), pgstore.ErrClosed)
	require.ErrorIs(t, c.DropTable(ctx, "cars"), pgstore.ErrClosed)

	// None of them touched the database.
	after := connectSchema(t, schema)
	requireRecord(t, after, "cars/bmw", 1, `"bmw"`)
	require.Equal(t, schema, c.Schema(), "Schema still answers")
}

func TestSchemaReturnsTheSchemaGivenToWithSchema(t *testing.T) {
	t.Parallel()
	schema := pgtest.Schema(t)
	require.Equal(t, schema, connectSchema(t, schema).Schema())

	mixed := `Mixed "Case" ` + schema
	t.Cleanup(func() { pgtest.DropSchema(t, pgtest.URL(t), mixed) })
	require.Equal(t, mixed, connectSchema(t, mixed).Schema(), "exactly as given")

	// New on a caller's pool as well. (Without WithSchema a connector would
	// create the schema DefaultSchema in the shared test database: not here.)
	c, err := pgstore.New(testCtx(t), pgtest.Pool(t), pgstore.WithSchema(schema))
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, c.Close(context.Background())) })
	require.Equal(t, schema, c.Schema())
}

func TestTheDefaultSchemaIsDefaultSchema(t *testing.T) {
	t.Parallel()
	// Check prepares nothing, so it shows the default schema without
	// creating it in the shared database.
	report, err := pgstore.Check(testCtx(t), pgtest.URL(t))
	require.NoError(t, err)
	require.Equal(t, pgstore.DefaultSchema, report.Schema)
	require.Equal(t, "ds", pgstore.DefaultSchema)
}

// keys returns the keys of a map, sorted.
func keys(m map[string]int64) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// ---- Schemas of many tables ----

// GetSchemaOverview counted every table in one statement, which takes a lock
// on each table and its primary-key index at once, in PostgreSQL's lock
// table, shared by all sessions: on a schema of a few thousand tables the
// overview failed with "out of shared memory" (SQLSTATE 53200), and any other
// session might fail the same way while it ran. It now counts a chunk of
// tables per statement, within the per-transaction share of the lock table.
func TestSchemaOverviewOfMoreTablesThanTheLockTableHolds(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	// On a private server of a small lock table: as many tables as the
	// shared server's would hold would take it long to create, and running
	// its lock table short would hurt every other session on it.
	url := pgtest.Private(t, "max_locks_per_transaction=10", "max_connections=20")
	pool, err := pgxpool.New(ctx, url)
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	const schema = "pgstore_overview"
	c := connectURL(t, url, schema)
	var capacity int
	require.NoError(t, pool.QueryRow(ctx, `SELECT current_setting('max_locks_per_transaction')::int *
		(current_setting('max_connections')::int + current_setting('max_prepared_transactions')::int)`).Scan(&capacity))
	// Two locks a table: half as many again as the lock table holds.
	n := capacity * 3 / 4
	createTablesInParallel(t, pool, schema, n, capacity/40)

	estimate, err := c.GetSchemaOverviewOf(ctx, schema, true)
	require.NoError(t, err)
	require.Len(t, estimate, n)

	exact, err := c.GetSchemaOverview(ctx)
	require.NoError(t, err, "the exact overview of %d tables", n)
	require.Len(t, exact, n)
	for name, count := range exact {
		require.Zero(t, count, name)
	}
}

// createTablesInParallel makes n empty record tables t0, t1, ... the way
// pgstore does, minus the triggers, in transactions of chunk tables (three
// locks each: table, index, TOAST table).
func createTablesInParallel(t testing.TB, pool *pgxpool.Pool, schema string, n, chunk int) {
	t.Helper()
	ctx := testCtx(t)
	_, err := pool.Exec(ctx, "CREATE SCHEMA IF NOT EXISTS "+pgx.Identifier{schema}.Sanitize())
	require.NoError(t, err)
	const workers = 4
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		wg.Go(func() {
			for start := w * chunk; start < n; start += workers * chunk {
				var b pgx.Batch
				for i := start; i < min(start+chunk, n); i++ {
					table := ident(schema, fmt.Sprintf("t%d", i))
					b.Queue("CREATE TABLE " + table + " (id text PRIMARY KEY, version bigint NOT NULL, val jsonb NOT NULL)")
					b.Queue("COMMENT ON TABLE " + table + " IS 'pgstore records'")
				}
				if err := pool.SendBatch(ctx, &b).Close(); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}
}
