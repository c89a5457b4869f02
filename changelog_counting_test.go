package pgstore_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/pgstore/pgstore"
	"github.com/pgstore/pgstore/internal/pgtest"
)

// requireGapless checks that the log's positions run 1, 2, 3… from its
// first entry, and each table's offsets likewise from the table's first
// entry in the log (from first[table]+1 where given).
func requireGapless(t *testing.T, entries []faultEntry, first map[string]int64) {
	t.Helper()
	require.NotEmpty(t, entries)
	next := map[string]int64{}
	for i, e := range entries {
		require.Equal(t, entries[0].pos+int64(i), e.pos, "position of %v", e)
		want, seen := next[e.table]
		if !seen {
			want = first[e.table] + 1
		}
		require.Equal(t, want, e.off, "offset of %v", e)
		next[e.table] = e.off + 1
	}
}

// loggedSchema gives a test its context, a schema of its own with a change
// log, a connector on it that flushes at once, and a pool of its own.
func loggedSchema(t *testing.T) (context.Context, string, *pgstore.Connector, *pgxpool.Pool) {
	t.Helper()
	schema := pgtest.Schema(t)
	c := connectSchema(t, schema, pgstore.WithChangeLog(time.Hour), pgstore.WithWriteInterval(0))
	return testCtx(t), schema, c, pgtest.Pool(t)
}

// lastOffsets gives each table's last offset among entries.
func lastOffsets(entries []faultEntry) map[string]int64 {
	last := map[string]int64{}
	for _, e := range entries {
		last[e.table] = e.off
	}
	return last
}

// Writers count from the entries under the head lock, not by updating a
// row: behind a snapshot that no one ends (a dump, a session idle in a
// transaction), a row updated at every write would keep every version, and
// every write would step through them.
func TestWritesToALoggedSchemaUpdateNoRowToCount(t *testing.T) {
	t.Parallel()
	ctx, schema, c, pool := loggedSchema(t)
	require.NoError(t, c.Set(ctx, "a/0", 1, "first"))

	stuck, err := pool.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead})
	require.NoError(t, err)
	defer stuck.Rollback(context.Background()) //nolint:errcheck // the snapshot is all it is for
	_, err = stuck.Exec(ctx, "SELECT 1")
	require.NoError(t, err)

	versions := func() (head, offsets string) {
		require.NoError(t, pool.QueryRow(ctx, "SELECT xmin::text || ctid::text FROM "+ident(schema, "pgstore/log")).Scan(&head))
		require.NoError(t, pool.QueryRow(ctx, "SELECT coalesce(string_agg(xmin::text || ctid::text, ','), '') FROM "+ident(schema, "pgstore/log_offsets")).Scan(&offsets))
		return head, offsets
	}
	head, offsets := versions()
	for i := range 40 {
		table := []string{"a", "b"}[i%2]
		require.NoError(t, c.Set(ctx, fmt.Sprintf("%s/%d", table, i%5), int64(i+2), i))
	}
	require.NoError(t, c.Delete(ctx, "a/0"))
	afterHead, afterOffsets := versions()
	require.Equal(t, head, afterHead, "the head row is locked by writers, never updated")
	require.Equal(t, offsets, afterOffsets, "the offsets rows change only when the janitor rotates")

	entries := logEntries(t, pool, schema)
	requireGapless(t, entries, nil)
	require.Len(t, entries, 1+1+40+1+1, "CREATE_TABLE a, the first write, 40 writes, CREATE_TABLE b, the delete")
}

// The floors rise before the entries above them go: a table whose every
// entry has been dropped goes on from its last offset, and the log from its
// last position.
func TestPositionsAndOffsetsGoOnAfterEveryEntryIsDropped(t *testing.T) {
	t.Parallel()
	ctx, schema, c, pool := loggedSchema(t)
	for i := range 3 {
		require.NoError(t, c.Set(ctx, fmt.Sprintf("a/%d", i), 1, i))
	}
	require.NoError(t, c.RotateLog(ctx))
	for i := range 2 {
		require.NoError(t, c.Set(ctx, fmt.Sprintf("b/%d", i), 1, i))
	}
	before := logEntries(t, pool, schema)
	requireGapless(t, before, nil)
	last := lastOffsets(before)
	for range 4 { // every partition emptied once
		require.NoError(t, c.RotateLog(ctx))
	}
	require.Empty(t, logEntries(t, pool, schema))

	require.NoError(t, c.Set(ctx, "b/9", 1, "b again"))
	require.NoError(t, c.Set(ctx, "a/9", 1, "a again"))
	after := logEntries(t, pool, schema)
	require.Len(t, after, 2)
	require.Equal(t, before[len(before)-1].pos+1, after[0].pos, "the log goes on from its last position")
	requireGapless(t, after, last)
}

// A log made by an earlier pgstore, whose trigger counted by updating the
// head and offsets rows, is brought up to date by the next connector, and
// goes on from where that trigger left it.
func TestALogThatCountedInRowsGoesOnWhereItStood(t *testing.T) {
	t.Parallel()
	ctx, schema, c, pool := loggedSchema(t)
	require.NoError(t, c.Set(ctx, "a/1", 1, "new"))

	// The earlier pgstore's log: its indexes and its trigger function.
	entries := ident(schema, "pgstore/log_entries")
	for _, stmt := range []string{
		`DROP INDEX ` + ident(schema, "pgstore/log_entries_table_offset"),
		`DROP INDEX ` + ident(schema, "pgstore/log_entries_position"),
		`CREATE INDEX ON ` + entries + ` (position)`,
		// Where the log and its offsets stand, as that trigger kept them.
		`UPDATE ` + ident(schema, "pgstore/log") + ` SET position = (SELECT max(position) FROM ` + entries + `)`,
		`INSERT INTO ` + ident(schema, "pgstore/log_offsets") + ` SELECT tbl, max(off) FROM ` + entries + ` GROUP BY tbl`,
		fmt.Sprintf(`CREATE OR REPLACE FUNCTION %s.pgstore_log_v1() RETURNS trigger LANGUAGE plpgsql AS $fn$
DECLARE
	n bigint;
	first bigint;
	p smallint;
	o bigint;
	op "char" := CASE TG_OP WHEN 'INSERT' THEN 'I' WHEN 'UPDATE' THEN 'U' ELSE 'D' END;
BEGIN
	SELECT count(*) INTO n FROM changed_rows;
	IF n = 0 THEN
		RETURN NULL;
	END IF;
	UPDATE %s SET position = position + n RETURNING position - n, part INTO first, p;
	INSERT INTO %s AS t (tbl, off) VALUES (TG_TABLE_NAME, n)
		ON CONFLICT (tbl) DO UPDATE SET off = t.off + excluded.off RETURNING t.off - n INTO o;
	INSERT INTO %s (part, position, tbl, off, op, id, version, val)
		SELECT p, first + r.k, TG_TABLE_NAME, o + r.k, op, r.id, r.version, CASE WHEN op = 'D' THEN NULL ELSE r.val END
		FROM (SELECT row_number() OVER (ORDER BY c.id) AS k, c.id, c.version, c.val FROM changed_rows c) AS r;
	RETURN NULL;
END
$fn$`, pgx.Identifier{schema}.Sanitize(), ident(schema, "pgstore/log"), ident(schema, "pgstore/log_offsets"), entries),
	} {
		_, err := pool.Exec(ctx, stmt)
		require.NoError(t, err, stmt)
	}
	// Writes under the earlier trigger.
	for i := range 3 {
		_, err := pool.Exec(ctx, "INSERT INTO "+ident(schema, "a")+` (id, version, val) VALUES ($1, 1, '"old"')`, fmt.Sprintf("old%d", i))
		require.NoError(t, err)
	}

	c2 := connectSchema(t, schema, pgstore.WithWriteInterval(0))
	var upgraded bool
	require.NoError(t, pool.QueryRow(ctx, "SELECT to_regclass($1) IS NOT NULL", ident(schema, "pgstore/log_entries_table_offset")).Scan(&upgraded))
	require.True(t, upgraded, "the connector brought the log up to date")
	require.NoError(t, c2.Set(ctx, "a/2", 1, "after"))
	require.NoError(t, c2.Set(ctx, "b/1", 1, "after"))
	var before, after string
	require.NoError(t, pool.QueryRow(ctx, "SELECT xmin::text FROM "+ident(schema, "pgstore/log")).Scan(&before))
	require.NoError(t, c2.Set(ctx, "a/3", 1, "after"))
	require.NoError(t, pool.QueryRow(ctx, "SELECT xmin::text FROM "+ident(schema, "pgstore/log")).Scan(&after))
	require.Equal(t, before, after, "the trigger no longer updates the head")

	all := logEntries(t, pool, schema)
	requireGapless(t, all, nil)
	require.Len(t, all, 1+1+3+1+1+1+1, "CREATE_TABLE a, a/1, three old writes, a/2, CREATE_TABLE b, b/1, a/3")
}

// A writer whose snapshot is older than the head lock (repeatable read, or
// serializable) does not see what the writer before it appended: it fails
// with a serialization failure, which its client retries, rather than take
// a position or an offset again.
func TestARepeatableReadWriterBehindTheLogFailsToSerializeAndTakesNoNumberTwice(t *testing.T) {
	t.Parallel()
	ctx, schema, c, pool := loggedSchema(t)
	require.NoError(t, c.Set(ctx, "t/1", 1, "first"))
	insert := "INSERT INTO " + ident(schema, "t") + ` (id, version, val) VALUES ($1, 1, '"raw"')`

	behind, err := pool.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead})
	require.NoError(t, err)
	defer behind.Rollback(context.Background()) //nolint:errcheck // it fails
	_, err = behind.Exec(ctx, "SELECT 1")       // its snapshot
	require.NoError(t, err)
	require.NoError(t, c.Set(ctx, "t/2", 1, "meanwhile"))
	_, err = behind.Exec(ctx, insert, "raw")
	var pgErr *pgconn.PgError
	require.ErrorAs(t, err, &pgErr)
	require.Equal(t, "40001", pgErr.Code, "a serialization failure: %v", err)

	// Retried, in a snapshot of its own, it appends after the rest.
	again, err := pool.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead})
	require.NoError(t, err)
	_, err = again.Exec(ctx, insert, "raw")
	require.NoError(t, err)
	require.NoError(t, again.Commit(ctx))
	entries := logEntries(t, pool, schema)
	requireGapless(t, entries, nil)
	require.Equal(t, "raw", entries[len(entries)-1].id)
}

// The head's trigger raises the floors whoever switches the partition
// taking the appends, a janitor of an earlier pgstore too (which only
// empties the next partition and moves the head to it), and refuses to in
// a snapshot older than the appends it would have to see.
func TestAnyRotationRaisesTheFloorsAndOnlyInReadCommitted(t *testing.T) {
	t.Parallel()
	ctx, schema, c, pool := loggedSchema(t)
	for i := range 3 {
		require.NoError(t, c.Set(ctx, fmt.Sprintf("a/%d", i), 1, i))
	}
	head := ident(schema, "pgstore/log")
	rotate := func(tx pgx.Tx) error {
		var part int
		if err := tx.QueryRow(ctx, "SELECT part FROM "+head+" FOR UPDATE").Scan(&part); err != nil {
			return err
		}
		next := (part + 1) % 4
		if _, err := tx.Exec(ctx, "TRUNCATE "+ident(schema, fmt.Sprintf("pgstore/log_entries_%d", next))); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, "UPDATE "+head+" SET part = $1, rotated_at = now()", next)
		return err
	}

	stale, err := pool.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead})
	require.NoError(t, err)
	defer stale.Rollback(context.Background()) //nolint:errcheck // it fails
	_, err = stale.Exec(ctx, "SELECT 1")
	require.NoError(t, err)
	require.NoError(t, c.Set(ctx, "a/3", 1, 3)) // after the stale snapshot
	var pgErr *pgconn.PgError
	require.ErrorAs(t, rotate(stale), &pgErr)
	require.Equal(t, "40001", pgErr.Code)

	before := logEntries(t, pool, schema)
	last := lastOffsets(before)
	for range 4 { // as an earlier janitor would, past every entry
		require.NoError(t, pgx.BeginTxFunc(ctx, pool, pgx.TxOptions{IsoLevel: pgx.ReadCommitted}, rotate))
	}
	require.Empty(t, logEntries(t, pool, schema))
	require.NoError(t, c.Set(ctx, "a/9", 1, "again"))
	after := logEntries(t, pool, schema)
	require.Len(t, after, 1)
	require.Equal(t, before[len(before)-1].pos+1, after[0].pos)
	requireGapless(t, after, last)
}
