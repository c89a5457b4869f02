package pgstore_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log"
	"log/slog"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/pgstore/pgstore"
	"github.com/pgstore/pgstore/internal/pgtest"
)

// checkNames are the checks of every report, in order.
var checkNames = []string{
	"server version", "writable", "temporary tables", "TLS", "schema", "schema privileges", "trigger function",
	"table ownership", "LISTEN/NOTIFY", "notification queue", "change log",
}

func ExampleConnector_Check() {
	defer exampleSchema("pgstore_example_check")()
	ctx := context.Background()
	c, err := pgstore.Connect(ctx, exampleDatabaseURL(), pgstore.WithSchema("pgstore_example_check"))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close(ctx)

	report, err := c.Check(ctx)
	if err != nil {
		log.Fatal(err) // the checks could not run
	}
	if !report.OK() {
		fmt.Print(report) // each failed check, with its fix
	}
	fmt.Println(report.OK())
	// Output: true
}

func ExampleCheck() {
	// Before the first Connect: Check creates nothing, not even the schema.
	report, err := pgstore.Check(context.Background(), exampleDatabaseURL(), pgstore.WithSchema("pgstore_example_check"))
	if err != nil {
		log.Fatal(err)
	}
	if !report.OK() {
		fmt.Print(report)
	}
	fmt.Println(report.OK())
	// Output: true
}

func TestReportString(t *testing.T) {
	t.Parallel()
	r := pgstore.Report{
		ServerVersion: "15.20", User: "app", Database: "test", Schema: "ds",
		Checks: []pgstore.CheckResult{
			{Name: "schema", OK: true, Detail: `"ds" exists`},
			{Name: "table ownership", Detail: `role "app" does not own 2 tables`,
				Fix: "ALTER TABLE \"ds\".\"a\" OWNER TO \"app\";\nALTER TABLE \"ds\".\"b\" OWNER TO \"app\";"},
		},
	}
	require.False(t, r.OK())
	require.Equal(t, `pgstore check of schema "ds" as role "app" on database "test"
  ok    schema: "ds" exists
  FAIL  table ownership: role "app" does not own 2 tables
        fix: ALTER TABLE "ds"."a" OWNER TO "app";
             ALTER TABLE "ds"."b" OWNER TO "app";
1 of 2 checks failed
`, r.String())

	r.Checks = r.Checks[:1]
	require.True(t, r.OK())
	require.True(t, strings.HasSuffix(r.String(), "all 1 checks passed\n"), r.String())
	require.False(t, pgstore.Report{}.OK(), "a report without checks is not OK")
}

func TestCheckSuperuser(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	schema := pgtest.Schema(t)
	c := connectURL(t, pgtest.URL(t), schema)
	require.NoError(t, c.Set(ctx, "cars/bmw", 1, map[string]int{"hp": 300}))

	report, err := c.Check(ctx)
	require.NoError(t, err)
	require.True(t, report.OK(), report.String())
	require.Equal(t, checkNames, chkNames(report))
	require.Equal(t, schema, report.Schema)
	require.Equal(t, chkQueryString(t, "SELECT current_setting('server_version')"), report.ServerVersion)
	require.Equal(t, chkQueryString(t, "SELECT current_user"), report.User)
	require.Equal(t, chkQueryString(t, "SELECT current_database()"), report.Database)
	require.Contains(t, chkFind(t, report, "table ownership").Detail, "owns the 11 pgstore tables") // a record table, the markers' two, the settings and the log's seven
	require.Contains(t, report.String(), "all 11 checks passed")

	// A pool of one connection is enough: the LISTEN connection leaves the
	// pool, making room for the NOTIFY.
	report, err = pgstore.Check(ctx, withParam(t, pgtest.URL(t), "pool_max_conns", "1"), pgstore.WithSchema(schema))
	require.NoError(t, err)
	require.True(t, report.OK(), report.String())
}

func TestCheckErrors(t *testing.T) {
	t.Parallel()
	c := connectURL(t, pgtest.URL(t), pgtest.Schema(t))

	ctx, cancel := context.WithCancel(testCtx(t))
	cancel()
	_, err := c.Check(ctx)
	require.ErrorIs(t, err, context.Canceled, "a check that cannot run returns an error")

	require.NoError(t, c.Close(testCtx(t)))
	_, err = c.Check(testCtx(t))
	require.ErrorIs(t, err, pgstore.ErrClosed)

	_, err = pgstore.Check(testCtx(t), "postgres://nobody@127.0.0.1:1/none?connect_timeout=5")
	require.ErrorContains(t, err, "connect")

	_, err = pgstore.Check(testCtx(t), pgtest.URL(t), pgstore.WithSchema(""))
	require.ErrorContains(t, err, "WithSchema")
}

// TestCheckLeastPrivilege runs pgstore as a role with only the grants the
// README lists: CONNECT on the database, and USAGE and CREATE on a schema
// that an administrator created.
func TestCheckLeastPrivilege(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	schema := pgtest.Schema(t)
	chkAdmin(t, "CREATE SCHEMA "+pgx.Identifier{schema}.Sanitize())
	_, roleURL := chkRole(t, schema,
		"GRANT CONNECT ON DATABASE %[1]s TO %[2]s",
		"GRANT USAGE, CREATE ON SCHEMA %[3]s TO %[2]s")

	report, err := pgstore.Check(ctx, roleURL, pgstore.WithSchema(schema))
	require.NoError(t, err)
	require.True(t, report.OK(), report.String())

	c, err := pgstore.Connect(ctx, roleURL, pgstore.WithSchema(schema))
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, c.Close(context.Background())) })

	// The whole cycle works as that role: the change feed too.
	events := make(chan pgstore.Event, 16)
	sub, err := c.Subscribe(ctx, func(e pgstore.Event) { events <- e }, pgstore.ForEvents(pgstore.Insert))
	require.NoError(t, err)
	t.Cleanup(func() { sub.Close(context.Background()) })
	chkSetGetDelete(t, c)
	select {
	case e := <-events:
		require.Equal(t, pgstore.Insert, e.Type)
	case <-ctx.Done():
		t.Fatal("no INSERT event as the least-privileged role")
	}
	report, err = c.Check(ctx)
	require.NoError(t, err)
	require.True(t, report.OK(), report.String())
	require.Contains(t, chkFind(t, report, "table ownership").Detail, "owns the 11 pgstore tables") // a record table, the markers' two, the settings and the log's seven
}

// TestCheckRevokedGrants revokes the schema grants from a role that pgstore
// runs as: Check names the missing grant, and its fix restores them.
func TestCheckRevokedGrants(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	schema := pgtest.Schema(t)
	chkAdmin(t, "CREATE SCHEMA "+pgx.Identifier{schema}.Sanitize())
	role, roleURL := chkRole(t, schema,
		"GRANT CONNECT ON DATABASE %[1]s TO %[2]s",
		"GRANT USAGE, CREATE ON SCHEMA %[3]s TO %[2]s")
	c := connectURL(t, roleURL, schema)
	chkSetGetDelete(t, c)

	chkAdmin(t, fmt.Sprintf("REVOKE USAGE, CREATE ON SCHEMA %s FROM %s", pgx.Identifier{schema}.Sanitize(), pgx.Identifier{role}.Sanitize()))
	report, err := c.Check(ctx)
	require.NoError(t, err)
	require.False(t, report.OK(), report.String())
	failed := chkFailed(report)
	require.Equal(t, []string{"schema privileges", "change log"}, chkNames(pgstore.Report{Checks: failed}), report.String())
	require.Contains(t, failed[0].Detail, "lacks USAGE and CREATE on schema")
	require.Equal(t, fmt.Sprintf("GRANT USAGE, CREATE ON SCHEMA %s TO %s;", pgx.Identifier{schema}.Sanitize(), pgx.Identifier{role}.Sanitize()), failed[0].Fix)
	require.Contains(t, report.String(), "fix: GRANT USAGE, CREATE ON SCHEMA")
	require.Error(t, c.Set(ctx, "other/1", 1, 1), "without the grants, pgstore cannot create a table")
	_, err = pgstore.Connect(ctx, roleURL, pgstore.WithSchema(schema))
	require.ErrorContains(t, err, "permission denied")
	require.ErrorContains(t, err, "; as a role that may, run: "+failed[0].Fix, "Connect names the grant that Check prints")

	chkAdmin(t, "REVOKE CREATE ON SCHEMA "+pgx.Identifier{schema}.Sanitize()+" FROM "+pgx.Identifier{role}.Sanitize())
	chkAdmin(t, "GRANT USAGE ON SCHEMA "+pgx.Identifier{schema}.Sanitize()+" TO "+pgx.Identifier{role}.Sanitize())
	report, err = c.Check(ctx)
	require.NoError(t, err)
	require.Equal(t, fmt.Sprintf("GRANT CREATE ON SCHEMA %s TO %s;", pgx.Identifier{schema}.Sanitize(), pgx.Identifier{role}.Sanitize()),
		chkFind(t, report, "schema privileges").Fix, "only the missing privilege is granted")

	chkApplyFixes(t, report)
	report, err = c.Check(ctx)
	require.NoError(t, err)
	require.True(t, report.OK(), report.String())
	require.NoError(t, c.Set(ctx, "other/1", 1, 1))
}

// TestCheckFixes gives a role nothing but CONNECT on a schema whose table an
// administrator owns and whose trigger function PUBLIC may not execute:
// Check reports each, and running the fixes it prints makes it pass.
func TestCheckFixes(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	schema := pgtest.Schema(t)
	// Without a change log, whose own fixes are the next test's.
	admin := connectURL(t, pgtest.URL(t), schema, pgstore.WithoutChangeLog())
	require.NoError(t, admin.Set(ctx, "cars/bmw", 1, 1))
	require.NoError(t, admin.Set(ctx, `we"ird/1`, 1, 1))
	chkAdmin(t, "REVOKE EXECUTE ON FUNCTION "+pgx.Identifier{schema, "pgstore_notify_v1"}.Sanitize()+"() FROM PUBLIC")
	chkAdmin(t, "CREATE TABLE "+pgx.Identifier{schema, "by_hand"}.Sanitize()+" (x int)") // not pgstore's: not reported
	role, roleURL := chkRole(t, schema, "GRANT CONNECT ON DATABASE %[1]s TO %[2]s")
	s, r := pgx.Identifier{schema}.Sanitize(), pgx.Identifier{role}.Sanitize()

	report, err := pgstore.Check(ctx, roleURL, pgstore.WithSchema(schema))
	require.NoError(t, err)
	require.Equal(t, []string{"schema privileges", "trigger function", "table ownership"},
		chkNames(pgstore.Report{Checks: chkFailed(report)}), report.String())
	require.Equal(t, "GRANT USAGE, CREATE ON SCHEMA "+s+" TO "+r+";", chkFind(t, report, "schema privileges").Fix)
	require.Equal(t, "GRANT EXECUTE ON FUNCTION "+s+`."pgstore_notify_v1"() TO `+r+";", chkFind(t, report, "trigger function").Fix)
	ownership := chkFind(t, report, "table ownership")
	require.Contains(t, ownership.Detail, "does not own 5 of the 5 pgstore tables")
	var fixes []string
	for _, table := range []string{`"cars"`, `"pgstore/commits"`, `"pgstore/refused"`, `"pgstore/settings"`, `"we""ird"`} {
		fixes = append(fixes, "ALTER TABLE "+s+"."+table+" OWNER TO "+r+";")
	}
	require.Equal(t, strings.Join(fixes, "\n"), ownership.Fix, "its records' tables and pgstore's own, without which it cannot write")

	chkApplyFixes(t, report)
	report, err = pgstore.Check(ctx, roleURL, pgstore.WithSchema(schema))
	require.NoError(t, err)
	require.True(t, report.OK(), report.String())
	chkSetGetDelete(t, connectURL(t, roleURL, schema)) // the fixes are all it needs
}

// On a schema with a change log, the triggers of new tables call the log's
// functions too: Check names each that the role may not execute.
func TestCheckNamesTheChangeLogsFunctionsARoleMayNotExecute(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	schema := pgtest.Schema(t)
	connectURL(t, pgtest.URL(t), schema) // makes the schema, with its change log
	s := pgx.Identifier{schema}.Sanitize()
	chkAdmin(t, "REVOKE EXECUTE ON FUNCTION "+s+".pgstore_log_v1(), "+s+".pgstore_log_lock_v1() FROM PUBLIC")
	role, roleURL := chkRole(t, schema, "GRANT CONNECT ON DATABASE %[1]s TO %[2]s", "GRANT USAGE, CREATE ON SCHEMA %[3]s TO %[2]s")

	report, err := pgstore.Check(ctx, roleURL, pgstore.WithSchema(schema))
	require.NoError(t, err)
	fn := chkFind(t, report, "trigger function")
	require.False(t, fn.OK, report.String())
	require.Equal(t, "GRANT EXECUTE ON FUNCTION "+s+`."pgstore_log_lock_v1"(), `+s+`."pgstore_log_v1"() TO `+pgx.Identifier{role}.Sanitize()+";", fn.Fix)
	chkApplyFixes(t, report)
	report, err = pgstore.Check(ctx, roleURL, pgstore.WithSchema(schema))
	require.NoError(t, err)
	require.True(t, report.OK(), report.String())
	chkSetGetDelete(t, connectURL(t, roleURL, schema)) // through the log's triggers
}

// TestCheckMissingSchema checks a role that may not create the schema it is
// told to use.
func TestCheckMissingSchema(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	schema := pgtest.Schema(t)
	role, roleURL := chkRole(t, schema, "GRANT CONNECT ON DATABASE %[1]s TO %[2]s")

	report, err := pgstore.Check(ctx, roleURL, pgstore.WithSchema(schema))
	require.NoError(t, err)
	failed := chkFailed(report)
	require.Len(t, failed, 1, report.String())
	require.Equal(t, "schema", failed[0].Name)
	require.Equal(t, []string{"server version", "writable", "temporary tables", "TLS", "schema"}, chkNames(report)[:5],
		"no privileges in a schema that cannot be made are reported as ok")
	require.NotContains(t, chkNames(report), "schema privileges")
	_, err = pgstore.Connect(ctx, roleURL, pgstore.WithSchema(schema))
	require.ErrorContains(t, err, "; as a role that may, run: "+failed[0].Fix)
	require.Contains(t, failed[0].Detail, "may not create schemas")
	require.Equal(t, fmt.Sprintf("GRANT CREATE ON DATABASE %s TO %s;", pgx.Identifier{report.Database}.Sanitize(), pgx.Identifier{role}.Sanitize()), failed[0].Fix)

	chkApplyFixes(t, report)
	report, err = pgstore.Check(ctx, roleURL, pgstore.WithSchema(schema))
	require.NoError(t, err)
	require.True(t, report.OK(), report.String())
	require.Contains(t, chkFind(t, report, "schema").Detail, "may create it")

	// With that grant, pgstore creates the schema and owns everything.
	c := connectURL(t, roleURL, schema)
	chkSetGetDelete(t, c)
	report, err = c.Check(ctx)
	require.NoError(t, err)
	require.True(t, report.OK(), report.String())
}

// TestCheckWithoutTemporaryTables runs pgstore as a role that may not create
// temporary tables, in a database of the test's own since the privilege is a
// database's: large batches still land, as array upserts, after one
// warning, and Check names the grant that lets them be copied.
func TestCheckWithoutTemporaryTables(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	role, roleURL := chkRole(t, "")
	db := "pgstore_test_db_" + chkRandom(t)
	d, r := pgx.Identifier{db}.Sanitize(), pgx.Identifier{role}.Sanitize()
	chkAdmin(t, "CREATE DATABASE "+d+" TEMPLATE template0")
	t.Cleanup(func() { chkAdmin(t, "DROP DATABASE "+d+" WITH (FORCE)") })
	chkAdmin(t, "REVOKE TEMPORARY ON DATABASE "+d+" FROM PUBLIC", "GRANT CONNECT, CREATE ON DATABASE "+d+" TO "+r)
	dbURL := chkWithDatabase(t, roleURL, db)

	var logs syncBuffer
	c, counter := connectCounted(t, dbURL, pgstore.DefaultSchema, pgstore.WithLogger(slog.New(slog.NewTextHandler(&logs, nil))),
		pgstore.WithWriteInterval(time.Hour), pgstore.WithMaxBatchSize(pgstore.StageMinRows))
	results := setMany(ctx, c, "big", 2*pgstore.StageMinRows) // two full batches
	closeNow(t, c)
	waitAll(t, results)
	require.Equal(t, 1, strings.Count(logs.String(), "may not create temporary tables"), logs.String())
	require.Equal(t, 1, counter.stagingBegins(), "once refused, staging is not tried again")
	require.Zero(t, counter.staged())

	c = connectURL(t, dbURL, pgstore.DefaultSchema)
	require.EqualValues(t, len(results), rowCount(t, c, pgstore.DefaultSchema, "big"))
	report, err := c.Check(ctx)
	require.NoError(t, err)
	failed := chkFailed(report)
	require.Equal(t, []string{"temporary tables"}, chkNames(pgstore.Report{Checks: failed}), report.String())
	require.Contains(t, failed[0].Detail, "writes work, but large batches go as array upserts")
	require.Equal(t, "GRANT TEMPORARY ON DATABASE "+d+" TO "+r+";", failed[0].Fix)

	chkApplyFixes(t, report)
	report, err = c.Check(ctx)
	require.NoError(t, err)
	require.True(t, report.OK(), report.String())
}

// chkSetGetDelete writes, reads and deletes a record.
func chkSetGetDelete(t *testing.T, c *pgstore.Connector) {
	t.Helper()
	ctx := testCtx(t)
	require.NoError(t, c.Set(ctx, "cars/bmw", 3, map[string]string{"color": "blue"}))
	rec, err := c.Get(ctx, "cars/bmw")
	require.NoError(t, err)
	require.Equal(t, int64(3), rec.Version)
	require.JSONEq(t, `{"color": "blue"}`, string(rec.Value))
	require.NoError(t, c.Delete(ctx, "cars/bmw"))
	_, err = c.Get(ctx, "cars/bmw")
	require.ErrorIs(t, err, pgstore.ErrNotFound)
}

// chkAdmin runs statements as the test server's administrator. It works in
// cleanups too, where the test's context has ended. Calls take turns, across
// test processes too: grants on one database from two sessions at once
// update the same catalogue row, and one of them fails ("tuple concurrently
// updated").
func chkAdmin(t testing.TB, sql ...string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, pgtest.URL(t))
	require.NoError(t, err)
	defer conn.Close(ctx) // also releases the lock
	_, err = conn.Exec(ctx, "SELECT pg_advisory_lock(hashtextextended('pgstore tests: chkAdmin', 0))")
	require.NoError(t, err)
	for _, stmt := range sql {
		_, err := conn.Exec(ctx, stmt)
		require.NoError(t, err, stmt)
	}
}

func chkQueryString(t testing.TB, sql string) string {
	t.Helper()
	conn, err := pgx.Connect(testCtx(t), pgtest.URL(t))
	require.NoError(t, err)
	defer conn.Close(context.Background())
	var s string
	require.NoError(t, conn.QueryRow(testCtx(t), sql).Scan(&s))
	return s
}

// chkRole creates a login role of the test's own and returns its name and a
// connection string for it. Each grant is a format whose %[1]s is the
// database, %[2]s the role and %[3]s the schema, all quoted. The role, its
// objects and its grants are dropped when the test ends: after the test's
// connectors are closed, before the schema of an earlier pgtest.Schema is
// dropped.
func chkRole(t testing.TB, schema string, grants ...string) (role, connString string) {
	t.Helper()
	role, password := "pgstore_test_role_"+chkRandom(t), chkRandom(t)
	cfg, err := pgx.ParseConfig(pgtest.URL(t))
	require.NoError(t, err)
	r := pgx.Identifier{role}.Sanitize()
	chkAdmin(t, fmt.Sprintf("CREATE ROLE %s LOGIN PASSWORD '%s'", r, password))
	t.Cleanup(func() { chkAdmin(t, "DROP OWNED BY "+r, "DROP ROLE "+r) })
	for _, g := range grants {
		chkAdmin(t, fmt.Sprintf(g, pgx.Identifier{cfg.Database}.Sanitize(), r, pgx.Identifier{schema}.Sanitize()))
	}
	return role, chkWithUser(t, pgtest.URL(t), role, password)
}

func chkRandom(t testing.TB) string {
	var b [6]byte
	_, err := rand.Read(b[:])
	require.NoError(t, err)
	return hex.EncodeToString(b[:])
}

// chkWithUser returns the connection string with another user and password.
func chkWithUser(t testing.TB, connString, user, password string) string {
	t.Helper()
	if strings.HasPrefix(connString, "postgres://") || strings.HasPrefix(connString, "postgresql://") {
		u, err := url.Parse(connString)
		require.NoError(t, err)
		u.User = url.UserPassword(user, password)
		return u.String()
	}
	return fmt.Sprintf("%s user='%s' password='%s'", connString, user, password)
}

// chkWithDatabase returns the connection string with another database.
func chkWithDatabase(t testing.TB, connString, database string) string {
	t.Helper()
	if strings.HasPrefix(connString, "postgres://") || strings.HasPrefix(connString, "postgresql://") {
		u, err := url.Parse(connString)
		require.NoError(t, err)
		u.Path = "/" + database
		return u.String()
	}
	return withParam(t, connString, "dbname", database)
}

// chkApplyFixes runs, as the administrator, the fix of each failed check.
func chkApplyFixes(t testing.TB, r pgstore.Report) {
	t.Helper()
	for _, c := range chkFailed(r) {
		chkAdmin(t, strings.Split(c.Fix, "\n")...)
	}
}

func chkFailed(r pgstore.Report) []pgstore.CheckResult {
	var failed []pgstore.CheckResult
	for _, c := range r.Checks {
		if !c.OK {
			failed = append(failed, c)
		}
	}
	return failed
}

func chkNames(r pgstore.Report) []string {
	var names []string
	for _, c := range r.Checks {
		names = append(names, c.Name)
	}
	return names
}

func chkFind(t testing.TB, r pgstore.Report, name string) pgstore.CheckResult {
	t.Helper()
	for _, c := range r.Checks {
		if c.Name == name {
			return c
		}
	}
	t.Fatalf("no check %q in the report:\n%s", name, r)
	return pgstore.CheckResult{}
}

// TestCheckTransactionPooler runs Check through PgBouncer: in transaction
// mode the LISTEN/NOTIFY check fails with its fix, in session mode it passes.
// It skips where PgBouncer is not installed.
func TestCheckTransactionPooler(t *testing.T) {
	t.Parallel()
	bouncerURL := chkBouncer(t)
	schema := pgtest.Schema(t)
	ctx := testCtx(t)

	report, err := pgstore.Check(ctx, bouncerURL("test_transaction"), pgstore.WithSchema(schema))
	require.NoError(t, err)
	failed := chkFailed(report)
	require.Len(t, failed, 1, report.String())
	require.Equal(t, "LISTEN/NOTIFY", failed[0].Name)
	require.Contains(t, failed[0].Detail, "no notification came back")
	require.Contains(t, failed[0].Fix, "pool_mode = session")

	report, err = pgstore.Check(ctx, bouncerURL("test_session"), pgstore.WithSchema(schema))
	require.NoError(t, err)
	require.True(t, report.OK(), report.String())
}

// TestLargeBatchesThroughATransactionPooler copies large batches through
// PgBouncer in transaction mode, which here also discards the server
// session, temporary tables included, after every transaction: each batch
// creates the staging table it copies into.
func TestLargeBatchesThroughATransactionPooler(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	bouncerURL := chkBouncer(t)
	schema := pgtest.Schema(t)
	c, counter := connectCounted(t, bouncerURL("test_transaction"), schema,
		pgstore.WithWriteInterval(time.Hour), pgstore.WithMaxBatchSize(pgstore.StageMinRows))
	results := setMany(ctx, c, "big", 3*pgstore.StageMinRows) // three full batches
	waitAll(t, results)
	require.Equal(t, 3, counter.staged())
	require.EqualValues(t, len(results), rowCount(t, connectURL(t, pgtest.URL(t), schema), schema, "big"))
}

// chkBouncer starts PgBouncer in front of the test server, stopped when the
// test ends, with the databases test_transaction and test_session pooled in
// those modes, both discarding the server session after every transaction. It returns a function giving the connection string of each.
func chkBouncer(t *testing.T) func(database string) string {
	t.Helper()
	bin, err := exec.LookPath("pgbouncer")
	if err != nil {
		t.Skipf("PgBouncer is not installed (apt-get install pgbouncer): %v", err)
	}
	cfg, err := pgx.ParseConfig(pgtest.URL(t))
	require.NoError(t, err)
	if strings.HasPrefix(cfg.Host, "/") {
		t.Skipf("the test server is reached through the socket in %s; the test needs TCP", cfg.Host)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	port := ln.Addr().(*net.TCPAddr).Port
	require.NoError(t, ln.Close())

	// PgBouncer refuses to run as root: as root, it runs as the nobody
	// user, which must be able to read its files.
	dir, err := os.MkdirTemp("", "pgstore-bouncer-")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	require.NoError(t, os.Chmod(dir, 0o755))
	server := fmt.Sprintf("host=%s port=%d dbname=%s", cfg.Host, cfg.Port, cfg.Database)
	if cfg.Password != "" {
		server += " password=" + cfg.Password
	}
	ini := fmt.Sprintf(`[databases]
test_transaction = %[1]s pool_mode=transaction
test_session = %[1]s pool_mode=session
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = %[2]d
unix_socket_dir =
auth_type = trust
auth_file = %[3]s
pidfile =
logfile =
ignore_startup_parameters = extra_float_digits
server_reset_query = DISCARD ALL
server_reset_query_always = 1
`, server, port, filepath.Join(dir, "users.txt"))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "users.txt"), fmt.Appendf(nil, "%q \"\"\n", cfg.User), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "pgbouncer.ini"), []byte(ini), 0o644))
	args := []string{filepath.Join(dir, "pgbouncer.ini")}
	if os.Geteuid() == 0 {
		args = append([]string{"-u", "nobody"}, args...)
	}
	logPath := filepath.Join(dir, "pgbouncer.log")
	logFile, err := os.Create(logPath)
	require.NoError(t, err)
	defer logFile.Close() // the process has its own copy
	logged := func() string {
		b, _ := os.ReadFile(logPath)
		return string(b)
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	require.NoError(t, cmd.Start())
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		if t.Failed() {
			t.Logf("PgBouncer's log:\n%s", logged())
		}
	})

	connString := func(database string) string {
		// Through a transaction pooler, statements cannot be prepared.
		return fmt.Sprintf("host=127.0.0.1 port=%d user='%s' password='%s' dbname=%s default_query_exec_mode=simple_protocol",
			port, cfg.User, cfg.Password, database)
	}
	// Wait until PgBouncer takes connections.
	ctx, cancel := context.WithTimeout(testCtx(t), 10*time.Second)
	defer cancel()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		conn, err := pgx.Connect(ctx, connString("test_session"))
		if err == nil {
			conn.Close(ctx)
			return connString
		}
		select {
		case <-ctx.Done():
			t.Fatalf("PgBouncer does not take connections: %v\n%s", err, logged())
		case <-tick.C:
		}
	}
}

// A session that listens and stops reading holds the notification queue
// back; Check fails at 1% and names it. On a private server: the test fills
// 88 MB of the queue.
func TestCheckNamesTheSessionThatHoldsTheNotificationQueueBack(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	url := pgtest.Private(t)
	stuckPID := holdNotificationQueue(t, ctx, url)

	c := connectURL(t, url, "pgstore_check_queue")
	report, err := c.Check(ctx)
	require.NoError(t, err)
	queue := chkFind(t, report, "notification queue")
	require.False(t, queue.OK, report.String())
	require.Contains(t, queue.Detail, fmt.Sprintf("likely holding it: pid %d", stuckPID))
	require.Contains(t, queue.Detail, "idle in transaction")
	require.Contains(t, queue.Fix, "pg_terminate_backend")
	waitUntil(t, ctx, "Stats shows the queue's usage", func() bool { return c.Stats().NotifyQueueUsage > 0.01 })
}
