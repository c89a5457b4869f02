package pgstore

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// A Report is what Check found: the server, who pgstore connects as, and the
// result of each check. Print it with String.
type Report struct {
	// ServerVersion is the server's version as it reports it
	// (server_version), such as "15.20 (Debian 15.20-0+deb12u1)".
	ServerVersion string
	// User and Database are the role pgstore connects as (current_user) and
	// its database; Schema is the connector's schema.
	User, Database, Schema string
	// Checks are the results, in the order they ran.
	Checks []CheckResult
}

// A CheckResult is the outcome of one check of a Report.
type CheckResult struct {
	// Name says what was checked, such as "schema privileges".
	Name string
	OK   bool
	// Detail is what the check found; for a failed check, why it fails.
	Detail string
	// Fix is, for a failed check, what fixes it: SQL statements for a
	// superuser (or the owner of the objects) to run, one per line, or the
	// change to make when SQL cannot fix it.
	Fix string
}

// OK reports whether the report holds checks and every one passed.
func (r Report) OK() bool {
	for _, c := range r.Checks {
		if !c.OK {
			return false
		}
	}
	return len(r.Checks) > 0
}

// String returns the report as text for people: one line per check, and
// under each failed one its fix.
func (r Report) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "pgstore check of schema %s as role %s on database %s\n",
		quoteIdent(r.Schema), quoteIdent(r.User), quoteIdent(r.Database))
	failed := 0
	for _, c := range r.Checks {
		status := "ok  "
		if !c.OK {
			status = "FAIL"
			failed++
		}
		fmt.Fprintf(&b, "  %s  %s: %s\n", status, c.Name, c.Detail)
		if !c.OK && c.Fix != "" {
			for i, line := range strings.Split(c.Fix, "\n") {
				prefix := "fix:"
				if i > 0 {
					prefix = "    "
				}
				fmt.Fprintf(&b, "        %s %s\n", prefix, line)
			}
		}
	}
	switch {
	case len(r.Checks) == 0:
		b.WriteString("no checks ran\n")
	case failed == 0:
		fmt.Fprintf(&b, "all %d checks passed\n", len(r.Checks))
	default:
		fmt.Fprintf(&b, "%d of %d checks failed\n", failed, len(r.Checks))
	}
	return b.String()
}

// Check limits.
const (
	// minServerVersion is the first release with what pgstore's DDL uses:
	// CREATE TRIGGER ... EXECUTE FUNCTION and hashtextextended.
	minServerVersion = 110000
	// notifyTimeout bounds the wait for the test notification.
	notifyTimeout = 5 * time.Second
	// queueWarnUsage is the share of the notification queue above which
	// Check fails: when the queue is full, every NOTIFY, and so every
	// write to a pgstore table of a schema without a change log, fails at
	// commit. Readers that keep up leave it near 0; 1% (80 MB of the
	// default 8 GB) is a session that stopped reading, found long before
	// it fills the rest.
	queueWarnUsage = 0.01
)

// Check verifies what the connector needs from the server, as an operator
// would before going live, and returns a report of what passed and, for
// what failed, why and the statement that fixes it. The checks, in order:
//
//   - "server version": PostgreSQL 11 or later.
//   - "writable": a primary that accepts writes.
//   - "temporary tables": the role may create them (TEMPORARY on the
//     database, which every role has unless revoked), as copying large
//     batches does; without it writes work, but large batches are slower.
//   - "schema": the schema exists, or the role may create it (CREATE on the
//     database).
//   - "schema privileges": USAGE and CREATE on the schema.
//   - "trigger function": the role may execute pgstore's trigger function,
//     if it exists.
//   - "table ownership": the role owns every pgstore table of the schema,
//     as changing a table's triggers or dropping it requires.
//   - "LISTEN/NOTIFY": a notification sent on one connection of the pool
//     reaches another that listens, which a bouncer in transaction mode
//     prevents.
//   - "TLS": whether the connections are encrypted, and how; never failed.
//   - "notification queue": the server's queue is under 1% full; above,
//     it names the sessions likely to hold it back.
//   - "change log": whether the schema has one; if so its retention, its
//     oldest and newest positions, its size on disk and how far this
//     connector's subscriptions lag; it fails when a session idle in a
//     transaction holds the log's head, which every write then waits for.
//
// Check changes nothing in the database. Its error is only for when it
// cannot run at all (the server does not answer, ctx ends); failed checks
// are in the report.
func (c *Connector) Check(ctx context.Context) (Report, error) {
	if c.closing.Load() {
		return Report{}, ErrClosed
	}
	r := Report{Schema: c.cfg.schema}
	if err := c.pool.Ping(ctx); err != nil {
		return r, fmt.Errorf("pgstore: check: connect: %w", err)
	}
	for _, check := range []func(context.Context, *Report) error{
		c.checkServer,
		c.checkSchema,
		c.checkOwnership,
		c.checkNotify,
		c.checkQueue,
		c.checkLog,
	} {
		if err := check(ctx, &r); err != nil {
			return r, fmt.Errorf("pgstore: check: %w", err)
		}
	}
	return r, nil
}

// Check connects like Connect and runs Connector.Check, but prepares
// nothing: where Connect fails because a grant or the schema is missing,
// Check reports what is missing and the statement that fixes it. The pool it
// opens is closed before it returns.
func Check(ctx context.Context, connString string, opts ...Option) (Report, error) {
	cfg, err := newConfig(opts)
	if err != nil {
		return Report{}, err
	}
	poolCfg, err := parseConnString(connString)
	if err != nil {
		return Report{}, err
	}
	pool, err := pgxpool.NewWithConfig(ctx, poolCfg)
	if err != nil {
		return Report{}, fmt.Errorf("pgstore: %w", err)
	}
	defer pool.Close()
	c := &Connector{pool: pool, cfg: cfg}
	return c.Check(ctx)
}

// privilegeFixes returns, for an error that is a missing privilege, the
// statements that Check prints to grant what the role lacks, as a sentence
// to append to the error; else "".
func privilegeFixes(ctx context.Context, pool *pgxpool.Pool, cfg config, err error) string {
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "42501" {
		return ""
	}
	c := &Connector{pool: pool, cfg: cfg}
	r := Report{Schema: cfg.schema}
	for _, check := range []func(context.Context, *Report) error{c.checkServer, c.checkSchema, c.checkOwnership} {
		if check(ctx, &r) != nil {
			return ""
		}
	}
	var fixes []string
	for _, ch := range r.Checks {
		if !ch.OK && ch.Fix != "" && ch.Name != "temporary tables" { // which costs only speed
			fixes = append(fixes, ch.Fix)
		}
	}
	if len(fixes) == 0 {
		return ""
	}
	return "; as a role that may, run: " + strings.Join(fixes, " ")
}

func (r *Report) add(name string, ok bool, detail, fix string) {
	if ok {
		fix = ""
	}
	r.Checks = append(r.Checks, CheckResult{Name: name, OK: ok, Detail: detail, Fix: fix})
}

func quoteIdent(name string) string { return pgx.Identifier{name}.Sanitize() }

func (c *Connector) checkServer(ctx context.Context, r *Report) error {
	var versionNum int
	var inRecovery, readOnly, temporary bool
	err := c.pool.QueryRow(ctx, `SELECT current_setting('server_version'), current_setting('server_version_num')::int,
		current_user, current_database(), pg_is_in_recovery(), current_setting('transaction_read_only') = 'on',
		has_database_privilege(current_database(), 'TEMPORARY')`).
		Scan(&r.ServerVersion, &versionNum, &r.User, &r.Database, &inRecovery, &readOnly, &temporary)
	if err != nil {
		return err
	}
	r.add("server version", versionNum >= minServerVersion,
		fmt.Sprintf("PostgreSQL %s; pgstore needs %d or later", r.ServerVersion, minServerVersion/10000),
		fmt.Sprintf("upgrade the server to PostgreSQL %d or later", minServerVersion/10000))
	switch {
	case inRecovery:
		r.add("writable", false, "the server is a standby in recovery, which refuses writes",
			"connect to the primary; with several hosts in the connection string, add target_session_attrs=read-write")
	case readOnly:
		r.add("writable", false, fmt.Sprintf("transactions of role %s are read-only (default_transaction_read_only is on)", quoteIdent(r.User)),
			fmt.Sprintf("ALTER ROLE %s SET default_transaction_read_only = off;", quoteIdent(r.User)))
	default:
		r.add("writable", true, "a primary accepting writes", "")
	}
	role, database := quoteIdent(r.User), quoteIdent(r.Database)
	if temporary {
		r.add("temporary tables", true,
			fmt.Sprintf("role %s may create temporary tables in database %s, through which large batches are copied", role, database), "")
	} else {
		r.add("temporary tables", false,
			fmt.Sprintf("role %s may not create temporary tables in database %s: writes work, "+
				"but large batches go as array upserts instead of being copied, which is slower", role, database),
			fmt.Sprintf("GRANT TEMPORARY ON DATABASE %s TO %s;", database, role))
	}
	return c.checkTLS(ctx, r)
}

// checkTLS says how the pool's connections are secured. It fails nothing:
// whether a connection in clear is acceptable (on a loopback, in a private
// network) is the operator's call, made with sslmode.
//
// It looks at the client's side of a pooled connection, not at pg_stat_ssl:
// behind a bouncer, that is the bouncer's own link to the server.
func (c *Connector) checkTLS(ctx context.Context, r *Report) error {
	conn, err := c.pool.Acquire(ctx)
	if err != nil {
		return err
	}
	defer conn.Release()
	if tc, ok := conn.Conn().PgConn().Conn().(*tls.Conn); ok {
		state := tc.ConnectionState()
		r.add("TLS", true, fmt.Sprintf("connections use %s (%s)", tls.VersionName(state.Version), tls.CipherSuiteName(state.CipherSuite)), "")
	} else {
		r.add("TLS", true, "connections are not encrypted (sslmode=disable, or prefer with a server without TLS); set sslmode=verify-full to require it", "")
	}
	return nil
}

func (c *Connector) checkSchema(ctx context.Context, r *Report) error {
	var exists, usage, create, createSchemas, fnExists bool
	err := c.pool.QueryRow(ctx, `SELECT n.oid IS NOT NULL,
			coalesce(has_schema_privilege(n.oid, 'USAGE'), false),
			coalesce(has_schema_privilege(n.oid, 'CREATE'), false),
			has_database_privilege(current_database(), 'CREATE'),
			p.oid IS NOT NULL
		FROM (SELECT) AS one
		LEFT JOIN pg_namespace n ON n.nspname = $1
		LEFT JOIN pg_proc p ON p.pronamespace = n.oid AND p.proname = $2 AND p.pronargs = 0`,
		c.cfg.schema, notifyFunction).Scan(&exists, &usage, &create, &createSchemas, &fnExists)
	if err != nil {
		return err
	}
	schema, role := quoteIdent(c.cfg.schema), quoteIdent(r.User)
	function := pgx.Identifier{c.cfg.schema, notifyFunction}.Sanitize() + "()"

	if !exists {
		if createSchemas {
			r.add("schema", true, fmt.Sprintf("%s does not exist yet; role %s may create it", schema, role), "")
		} else {
			r.add("schema", false,
				fmt.Sprintf("%s does not exist, and role %s may not create schemas in database %s (or have the schema created for the role: CREATE SCHEMA %s AUTHORIZATION %s;)",
					schema, role, quoteIdent(r.Database), schema, role),
				fmt.Sprintf("GRANT CREATE ON DATABASE %s TO %s;", quoteIdent(r.Database), role))
			return nil // the privileges in a schema that cannot be made are moot
		}
		r.add("schema privileges", true, fmt.Sprintf("pgstore creates %s, owned by role %s", schema, role), "")
		r.add("trigger function", true, fmt.Sprintf("pgstore creates %s", function), "")
		return nil
	}

	r.add("schema", true, schema+" exists", "")
	var missing []string
	if !usage {
		missing = append(missing, "USAGE")
	}
	if !create {
		missing = append(missing, "CREATE")
	}
	if len(missing) == 0 {
		r.add("schema privileges", true, fmt.Sprintf("role %s has USAGE and CREATE on %s", role, schema), "")
	} else {
		r.add("schema privileges", false,
			fmt.Sprintf("role %s lacks %s on schema %s: pgstore needs USAGE to use its tables and CREATE to add tables", role, strings.Join(missing, " and "), schema),
			fmt.Sprintf("GRANT %s ON SCHEMA %s TO %s;", strings.Join(missing, ", "), schema, role))
	}
	if !fnExists {
		r.add("trigger function", true, fmt.Sprintf("pgstore creates %s", function), "")
		return nil
	}
	// The NOTIFY feed's function, and the change log's two where the
	// schema has a log: every trigger of a new table calls one of them.
	rows, err := c.pool.Query(ctx, `SELECT p.proname, has_function_privilege(p.oid, 'EXECUTE')
		FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
		WHERE n.nspname = $1 AND p.proname = ANY($2) AND p.pronargs = 0 ORDER BY p.proname`,
		c.cfg.schema, []string{notifyFunction, logFunction, headLockFunction})
	if err != nil {
		return err
	}
	var lacking, all []string
	var name string
	var execute bool
	_, err = pgx.ForEachRow(rows, []any{&name, &execute}, func() error {
		fn := pgx.Identifier{c.cfg.schema, name}.Sanitize() + "()"
		all = append(all, fn)
		if !execute {
			lacking = append(lacking, fn)
		}
		return nil
	})
	if err != nil {
		return err
	}
	if len(lacking) == 0 {
		r.add("trigger function", true, fmt.Sprintf("role %s may execute %s", role, strings.Join(all, ", ")), "")
		return nil
	}
	r.add("trigger function", false,
		fmt.Sprintf("role %s may not execute %s, which the triggers of new tables call", role, strings.Join(lacking, ", ")),
		fmt.Sprintf("GRANT EXECUTE ON FUNCTION %s TO %s;", strings.Join(lacking, ", "), role))
	return nil
}

func (c *Connector) checkOwnership(ctx context.Context, r *Report) error {
	rows, err := c.pool.Query(ctx, `SELECT c.relname, pg_get_userbyid(c.relowner), pg_has_role(c.relowner, 'USAGE')
		FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
		WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') AND (obj_description(c.oid, 'pg_class') = $2 OR c.relname LIKE 'pgstore/%')
		ORDER BY c.relname`, c.cfg.schema, tableMarker)
	if err != nil {
		return err
	}
	var name, owner string
	var owned bool
	var total int
	var others, fixes []string
	role := quoteIdent(r.User)
	_, err = pgx.ForEachRow(rows, []any{&name, &owner, &owned}, func() error {
		total++
		if !owned {
			others = append(others, fmt.Sprintf("%s (owner %s)", quoteIdent(name), quoteIdent(owner)))
			fixes = append(fixes, fmt.Sprintf("ALTER TABLE %s OWNER TO %s;", pgx.Identifier{c.cfg.schema, name}.Sanitize(), role))
		}
		return nil
	})
	if err != nil {
		return err
	}
	switch {
	case total == 0:
		r.add("table ownership", true, fmt.Sprintf("%s holds no pgstore tables yet", quoteIdent(c.cfg.schema)), "")
		return nil
	case len(others) == 0:
		r.add("table ownership", true, fmt.Sprintf("role %s owns the %d pgstore tables of %s", role, total, quoteIdent(c.cfg.schema)), "")
		return nil
	}
	r.add("table ownership", false,
		fmt.Sprintf("role %s does not own %d of the %d pgstore tables of %s (its records' and its own: markers, settings, the change log), "+
			"and it must own them to write through them, change their triggers or drop them: %s",
			role, len(others), total, quoteIdent(c.cfg.schema), strings.Join(others, ", ")),
		strings.Join(fixes, "\n"))
	return nil
}

// checkNotify sends a notification on one connection and waits for it on
// another, both from the pool, as the change feed does.
func (c *Connector) checkNotify(ctx context.Context, r *Report) error {
	const name = "LISTEN/NOTIFY"
	// The listening connection is closed afterwards rather than returned
	// to the pool, and is not the pool's: the NOTIFY has a place even with
	// a pool of one.
	conn, err := c.listeningConn(ctx)
	if err != nil {
		return err
	}
	defer func() {
		closeCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
		defer cancel()
		conn.Close(closeCtx)
	}()

	var b [8]byte
	if _, err := rand.Read(b[:]); err != nil {
		return err
	}
	channel := "pgstore_check_" + hex.EncodeToString(b[:])
	payload := hex.EncodeToString(b[:4])
	fail := func(format string, args ...any) error {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		r.add(name, false, fmt.Sprintf(format, args...),
			"connect pgstore to PostgreSQL directly or through a bouncer in session mode (PgBouncer pool_mode = session): the change feed needs a session of its own for LISTEN")
		return nil
	}
	if _, err := conn.Exec(ctx, "LISTEN "+quoteIdent(channel)); err != nil {
		return fail("LISTEN failed: %v", err)
	}
	start := time.Now()
	if _, err := c.pool.Exec(ctx, "SELECT pg_notify($1, $2)", channel, payload); err != nil {
		return fail("NOTIFY failed: %v", err)
	}
	waitCtx, cancel := context.WithTimeout(ctx, notifyTimeout)
	defer cancel()
	for {
		n, err := conn.WaitForNotification(waitCtx)
		if err != nil {
			if waitCtx.Err() != nil && ctx.Err() == nil {
				return fail("no notification came back within %v; a bouncer in transaction or statement mode between pgstore and PostgreSQL loses them", notifyTimeout)
			}
			return fail("waiting for the notification: %v", err)
		}
		if n.Channel == channel && n.Payload == payload {
			r.add(name, true, fmt.Sprintf("a notification came back in %v", time.Since(start).Round(100*time.Microsecond)), "")
			return nil
		}
	}
}

// defaultStuckAfter is how long a session may sit idle in a transaction
// holding the change log's head before Check calls it stuck.
const defaultStuckAfter = 10 * time.Second

func (c *Connector) checkLog(ctx context.Context, r *Report) error {
	const name = "change log"
	schema := c.cfg.schema
	state, err := readLogState(ctx, c.pool, schema)
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "42501" {
		r.add(name, false, fmt.Sprintf("role %s may not read the change log's tables (%s): the table ownership check says how to fix it", quoteIdent(r.User), pgErr.Message), "")
		return nil
	}
	if err != nil {
		return err
	}
	switch state {
	case logNone:
		if off, _ := logOffRecorded(ctx, c.pool, schema); off { // a schema without pgstore's tables records nothing
			r.add(name, true, "none, as WithoutChangeLog recorded: the feed is NOTIFY payloads, and a lost LISTEN connection costs subscribers a Resync (WithChangeLog turns the log on)", "")
		} else {
			r.add(name, true, "none yet: the next connector on the schema without WithoutChangeLog makes one", "")
		}
		return nil
	case logStarting:
		r.add(name, false, "being switched on, and not yet on: a connector stopped before every table appended to it; the NOTIFY feed still serves",
			"start a connector on the schema again, without WithoutChangeLog: it finishes the switch")
		return nil
	}
	var (
		retention time.Duration
		size      int64
	)
	head, err := readHead(ctx, c.pool, schema)
	if err != nil {
		return err
	}
	err = c.pool.QueryRow(ctx, "SELECT retention, "+logSizeExpr(schema)+" FROM "+pgx.Identifier{schema, logHead}.Sanitize()).
		Scan(&retention, &size)
	if err != nil {
		return err
	}
	detail := fmt.Sprintf("retention %v; positions %d to %d; %.1f MB on disk", retention, head.dropped+1, head.position, float64(size)/(1<<20))
	if lags := c.logLags(); len(lags) > 0 {
		detail += fmt.Sprintf("; this connector's %d subscription(s) lag by at most %d entries", len(lags), slices.Max(lags))
	}
	var stuck []string
	rows, err := c.pool.Query(ctx, `SELECT a.pid::text FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
		WHERE l.locktype = 'relation' AND l.relation = to_regclass($1) AND l.granted
		AND a.state LIKE 'idle in transaction%' AND a.state_change < now() - $2::interval`,
		pgx.Identifier{schema, logHead}.Sanitize(), c.cfg.stuckAfter)
	if err != nil {
		return err
	}
	if stuck, err = pgx.CollectRows(rows, pgx.RowTo[string]); err != nil {
		return err
	}
	if len(stuck) > 0 {
		r.add(name, false, detail+fmt.Sprintf(": session(s) %s sit idle in a transaction that wrote to the log, and every write to the schema waits for them", strings.Join(stuck, ", ")),
			"end them: SELECT pg_terminate_backend(<pid>); and set idle_in_transaction_session_timeout for the role that left them")
		return nil
	}
	r.add(name, true, detail, "")
	return nil
}

// quoteLiteral renders s as an SQL string literal, for the statements that
// cannot take it as a parameter (DDL, a regclass in a size expression).
func quoteLiteral(s string) string { return "'" + strings.ReplaceAll(s, "'", "''") + "'" }

func (c *Connector) checkQueue(ctx context.Context, r *Report) error {
	var usage float64
	if err := c.pool.QueryRow(ctx, "SELECT pg_notification_queue_usage()").Scan(&usage); err != nil {
		return err
	}
	detail := fmt.Sprintf("%.2f%% used", usage*100)
	if usage <= queueWarnUsage {
		r.add("notification queue", true, detail, "")
		return nil
	}
	// The queue is held back by the listening session furthest behind,
	// which PostgreSQL does not name: one that reads nothing while in a
	// transaction, or whose client stopped reading its socket.
	rows, err := c.pool.Query(ctx, `SELECT pid, coalesce(usename, ''), application_name, coalesce(state, ''), wait_event IS NOT DISTINCT FROM 'ClientWrite',
			coalesce(extract(epoch FROM now() - coalesce(xact_start, state_change)), 0)
		FROM pg_stat_activity
		WHERE pid <> pg_backend_pid() AND backend_type = 'client backend' AND (xact_start IS NOT NULL OR wait_event = 'ClientWrite')
		ORDER BY wait_event IS NOT DISTINCT FROM 'ClientWrite' DESC, xact_start NULLS LAST LIMIT 3`)
	if err != nil {
		return err
	}
	var suspects []string
	var (
		pid              int32
		user, app, state string
		clientWrite      bool
		seconds          float64
	)
	_, err = pgx.ForEachRow(rows, []any{&pid, &user, &app, &state, &clientWrite, &seconds}, func() error {
		what := fmt.Sprintf("%s for %s", state, time.Duration(seconds*float64(time.Second)).Round(time.Second))
		if clientWrite {
			what = "waiting for its client to read"
		}
		suspects = append(suspects, fmt.Sprintf("pid %d (user %q, application %q, %s)", pid, user, app, what))
		return nil
	})
	if err != nil {
		return err
	}
	detail += ": a session that LISTENs does not read its notifications; when the queue is full, every write to a pgstore table without a change log fails"
	if len(suspects) > 0 {
		detail += "; likely holding it: " + strings.Join(suspects, ", ")
	}
	r.add("notification queue", false, detail,
		"end the session that holds the queue back: SELECT pg_terminate_backend(<pid>); and set idle_in_transaction_session_timeout for its role")
	return nil
}
