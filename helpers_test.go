package pgstore_test

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/pgstore/pgstore"
	"github.com/pgstore/pgstore/internal/pgtest"
)

// connect returns a connector on a schema of the test's own, closed when the
// test ends.
func connect(t testing.TB, opts ...pgstore.Option) *pgstore.Connector {
	t.Helper()
	schema := pgtest.Schema(t)
	return connectSchema(t, schema, opts...)
}

// connectSchema returns a connector on the given schema, closed when the test
// ends (before the schema is dropped).
func connectSchema(t testing.TB, schema string, opts ...pgstore.Option) *pgstore.Connector {
	t.Helper()
	return connectURL(t, pgtest.URL(t), schema, opts...)
}

// connectURL is connectSchema on the server of another connection string: a
// private server, a proxy, a role's.
func connectURL(t testing.TB, connString, schema string, opts ...pgstore.Option) *pgstore.Connector {
	t.Helper()
	opts = append([]pgstore.Option{pgstore.WithSchema(schema), pgstore.WithLogger(testLogger(t))}, opts...)
	c, err := pgstore.Connect(context.Background(), connString, opts...)
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	t.Cleanup(func() {
		if err := c.Close(context.Background()); err != nil {
			t.Errorf("close: %v", err)
		}
	})
	return c
}

// connectNamed is connect that also returns the name of the test's schema,
// for raw queries and for opening more connectors on it.
func connectNamed(t testing.TB, opts ...pgstore.Option) (*pgstore.Connector, string) {
	t.Helper()
	schema := pgtest.Schema(t)
	return connectSchema(t, schema, opts...), schema
}

// testLogger sends the connector's log to the test's output, so that it shows
// with the test that caused it. Every connector of a test is closed before the
// test completes, so nothing logs afterwards.
func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn}))
}

// testCtx bounds a test's calls, so that a hang fails the test with a
// deadline error instead of stalling the whole run.
func testCtx(t testing.TB) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// ident quotes schema.table for raw SQL.
func ident(schema, table string) string {
	return pgx.Identifier{schema, table}.Sanitize()
}

// withParam returns the connection string, URL or key=value, with one more
// setting.
func withParam(t testing.TB, connString, key, value string) string {
	t.Helper()
	if strings.HasPrefix(connString, "postgres://") || strings.HasPrefix(connString, "postgresql://") {
		u, err := url.Parse(connString)
		require.NoError(t, err)
		q := u.Query()
		q.Set(key, value)
		u.RawQuery = q.Encode()
		return u.String()
	}
	return fmt.Sprintf("%s %s='%s'", connString, key, strings.NewReplacer(`\`, `\\`, `'`, `\'`).Replace(value))
}

// queryInt runs a query that returns one integer.
func queryInt(t testing.TB, c *pgstore.Connector, sql string, args ...any) int64 {
	t.Helper()
	rows, err := c.Query(testCtx(t), sql, args...)
	require.NoError(t, err)
	n, err := pgx.CollectExactlyOneRow(rows, pgx.RowTo[int64])
	require.NoError(t, err, "query %s", sql)
	return n
}

// rowCount counts the rows of a record table, bypassing the connector's
// buffer.
func rowCount(t testing.TB, c *pgstore.Connector, schema, table string) int64 {
	t.Helper()
	return queryInt(t, c, "SELECT count(*) FROM "+ident(schema, table))
}

// tableExists reports whether schema.table exists in the database.
func tableExists(t testing.TB, c *pgstore.Connector, schema, table string) bool {
	t.Helper()
	return queryInt(t, c, "SELECT count(*) FROM pg_tables WHERE schemaname = $1 AND tablename = $2", schema, table) == 1
}

// tableTriggers returns the names of a table's pgstore triggers.
func tableTriggers(t *testing.T, pool *pgxpool.Pool, schema, table string) []string {
	t.Helper()
	rows, err := pool.Query(testCtx(t), `SELECT tgname FROM pg_trigger WHERE tgrelid = $1::regclass AND tgname LIKE 'pgstore%' ORDER BY tgname`,
		ident(schema, table))
	require.NoError(t, err)
	names, err := pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	return names
}

// logTriggers are the pgstore triggers of a record table whose every event
// goes to the change log, as tableTriggers lists them.
var logTriggers = []string{"pgstore_log_delete", "pgstore_log_insert", "pgstore_log_lock", "pgstore_log_update"}

// storedRow reads a row straight from its table, bypassing the connector.
func storedRow(t testing.TB, c *pgstore.Connector, schema, table, id string) (version int64, val string, found bool) {
	t.Helper()
	rows, err := c.Query(testCtx(t), "SELECT version, val::text FROM "+ident(schema, table)+" WHERE id = $1", id)
	require.NoError(t, err)
	type row struct {
		Version int64
		Val     string
	}
	got, err := pgx.CollectRows(rows, pgx.RowToStructByPos[row])
	require.NoError(t, err)
	require.LessOrEqual(t, len(got), 1)
	if len(got) == 0 {
		return 0, "", false
	}
	return got[0].Version, got[0].Val, true
}

// requireRecord asserts that Get returns the version and the JSON value.
func requireRecord(t testing.TB, c *pgstore.Connector, key string, version int64, wantJSON string) {
	t.Helper()
	rec, err := c.Get(testCtx(t), key)
	require.NoError(t, err, "get %q", key)
	require.Equal(t, version, rec.Version, "version of %q", key)
	require.JSONEq(t, wantJSON, string(rec.Value), "value of %q", key)
}

// requireNotFound asserts that Get finds no record under key.
func requireNotFound(t testing.TB, c *pgstore.Connector, key string) {
	t.Helper()
	rec, err := c.Get(testCtx(t), key)
	require.ErrorIs(t, err, pgstore.ErrNotFound, "get %q returned %+v", key, rec)
}

// waitAll waits for every result and asserts that each write succeeded.
func waitAll(t testing.TB, results []*pgstore.Result) {
	t.Helper()
	ctx := testCtx(t)
	for i, r := range results {
		require.NoError(t, r.Wait(ctx), "write %d", i)
	}
}

// setMany writes the records table/0 … table/n-1, each holding its number,
// through SetAsync, and returns their results.
func setMany(ctx context.Context, c *pgstore.Connector, table string, n int) []*pgstore.Result {
	results := make([]*pgstore.Result, n)
	for i := range results {
		results[i] = c.SetAsync(ctx, fmt.Sprintf("%s/%d", table, i), 1, i)
	}
	return results
}

// closeNow closes a connector within the test, asserting it flushed cleanly.
func closeNow(t testing.TB, c *pgstore.Connector) {
	t.Helper()
	require.NoError(t, c.Close(testCtx(t)))
}

// randomASCII returns n random bytes from a 64-letter alphabet without "/":
// text that neither splits a key nor compresses.
func randomASCII(t testing.TB, n int) string {
	t.Helper()
	const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
	b := make([]byte, n)
	_, err := rand.Read(b)
	require.NoError(t, err)
	for i := range b {
		b[i] = alphabet[b[i]%64]
	}
	return string(b)
}

// jsonOf marshals v for comparisons with JSONEq.
func jsonOf(t testing.TB, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	require.NoError(t, err)
	return string(b)
}

// waitUntil polls cond, which asks the database or a channel, until it
// holds.
func waitUntil(t *testing.T, ctx context.Context, what string, cond func() bool) {
	t.Helper()
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		select {
		case <-tick.C:
		case <-ctx.Done():
			t.Fatalf("waiting until %s: %v", what, ctx.Err())
		}
	}
}

// holdNotificationQueue opens a session on url that listens and never reads
// (it sits in a transaction, where a session reads no notification), and
// fills about 1.1% of the notification queue (88 MB) behind it; it returns
// the session's process id. Only on a private server: the queue is the
// whole server's.
func holdNotificationQueue(t *testing.T, ctx context.Context, url string) uint32 {
	t.Helper()
	stuck, err := pgx.Connect(ctx, url)
	require.NoError(t, err)
	t.Cleanup(func() { stuck.Close(context.Background()) })
	_, err = stuck.Exec(ctx, "LISTEN pgstore_test_stuck")
	require.NoError(t, err)
	tx, err := stuck.Begin(ctx)
	require.NoError(t, err)
	t.Cleanup(func() { tx.Rollback(context.Background()) })
	_, err = tx.Exec(ctx, "SELECT 1")
	require.NoError(t, err)

	sender, err := pgx.Connect(ctx, url)
	require.NoError(t, err)
	defer sender.Close(context.Background())
	_, err = sender.Exec(ctx, "SELECT pg_notify('pgstore_test_stuck', i || repeat('x', 7900)) FROM generate_series(1, 11000) AS i")
	require.NoError(t, err)
	return stuck.PgConn().PID()
}
