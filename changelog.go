package pgstore

import (
	"bytes"
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/jackc/pgx/v5/pgxpool"
)

// The change log is the durable change feed: the triggers of the record
// tables append every change, with its value, to a log in the schema, in
// the same transaction as the change.
//
// Positions are gapless and in commit order because appends are
// serialised: a change locks the log's one head row, and holds the lock
// until it commits or rolls back, so the next writer reads where the log
// ends only once the first is visible (a transaction is visible before its
// locks are released). A reader that read up to position p and asks for
// what is after p can so never miss an entry that commits later with a
// smaller number. PostgreSQL serialises committing NOTIFY senders on one
// lock already; this is the same price, paid at the first write of a
// transaction instead of at its commit.
//
// The lock is a row lock only: writers never update the head, or a row per
// table, to count. Such a row would gain a version at every write, which
// nothing may remove while any snapshot is older (a dump, a session idle in
// a transaction), and every write and every read of the head would step
// through them all (the benchmark's stuck figure: a one-row Set's p50 went
// from 1.1 to 4.0 ms over 20,000 writes behind one open snapshot, and
// would have gone on growing). A writer
// under the lock reads instead where the log ends (see logEndExpr) and
// where the table's offsets end (tableOffsetExpr), from the entries that
// the partition taking the appends holds, above floors that the head's
// trigger raises, under the same lock, when the partition switches.
// Unique indexes stand guard: a writer whose snapshot is older than the
// lock (repeatable read) and would take a number again fails instead.
//
// The log is a table partitioned by list into logParts partitions, of
// which one takes the appends. Retention rotates them: every half
// retention, the oldest partition is emptied with TRUNCATE (no DELETE per
// row) and takes the appends from then on. An entry is so kept for at
// least one and a half times the retention, and dropped after about twice it
// while a connector runs (a partition in use puts it off to the next look).

// Names of the log's tables in the schema; a record table's name never holds
// a "/".
const (
	logHead    = "pgstore/log"
	logEntries = "pgstore/log_entries"
	logOffsets = "pgstore/log_offsets"
	logParts   = 4
)

// logFunction is the trigger function that appends to the log, and
// headLockFunction the one that takes the log's head lock before a
// statement's rows are locked.
const (
	logFunction      = "pgstore_log_v1"
	headLockFunction = "pgstore_log_lock_v1"
)

// floorsFunction is the head's trigger function that raises the floors (see
// the top of this file) whenever the partition taking the appends changes,
// whoever changes it: a janitor of an earlier pgstore, which knows nothing
// of floors, too.
const (
	floorsFunction = "pgstore_log_floors_v1"
	floorsTrigger  = "pgstore_log_floors"
)

// headLockTrigger is the name of a record table's trigger that runs
// headLockFunction. Every writer, pgstore's or not, so takes the head lock
// before any row lock of its statement: were the head taken after (by the
// trigger that appends, at the statement's end), a writer holding the head
// and waiting for a row could wait on one holding that row and waiting for
// the head.
const headLockTrigger = "pgstore_log_lock"

// logOps are the op codes of log entries, by event type.
var logOps = map[EventType]string{CreateTable: "C", DestroyTable: "X", Insert: "I", Update: "U", Delete: "D"}

func logPart(schema string, part int) string {
	return pgx.Identifier{schema, fmt.Sprintf("%s_%d", logEntries, part)}.Sanitize()
}

// createLogSQL creates the log's tables and its trigger function.
func createLogSQL(schema string, retention time.Duration) []string {
	head := pgx.Identifier{schema, logHead}.Sanitize()
	entries := pgx.Identifier{schema, logEntries}.Sanitize()
	offsets := pgx.Identifier{schema, logOffsets}.Sanitize()
	stmts := []string{
		"CREATE TABLE " + head + ` (one boolean PRIMARY KEY DEFAULT true CHECK (one),
			log_id uuid NOT NULL DEFAULT gen_random_uuid(),
			position bigint NOT NULL DEFAULT 0,
			dropped bigint NOT NULL DEFAULT 0,
			part smallint NOT NULL DEFAULT 0,
			retention interval NOT NULL,
			rotated_at timestamptz NOT NULL DEFAULT now(),
			active boolean NOT NULL DEFAULT false)`,
		"INSERT INTO " + head + " (retention) VALUES (" + intervalLiteral(retention) + ")",
		"CREATE TABLE " + offsets + " (tbl text PRIMARY KEY, off bigint NOT NULL)",
		"CREATE TABLE " + entries + ` (part smallint NOT NULL, position bigint NOT NULL, tbl text NOT NULL, off bigint NOT NULL,
			op "char" NOT NULL, id text COLLATE "C", version bigint, val jsonb, at timestamptz NOT NULL DEFAULT clock_timestamp())
			PARTITION BY LIST (part)`,
	}
	for p := range logParts {
		stmts = append(stmts, fmt.Sprintf("CREATE TABLE %s PARTITION OF %s FOR VALUES IN (%d)", logPart(schema, p), entries, p))
	}
	stmts = append(stmts, logIndexesSQL(schema)...)
	stmts = append(stmts, floorsSQL(schema)...)
	return append(stmts, logFunctionSQL(schema, notifyRoom), headLockFunctionSQL(schema))
}

// floorsSQL creates, or replaces, the head's trigger that raises the
// floors when the partition taking the appends changes: the head's position
// to the last position of the partition that took them until then, and the
// floor of each table with entries there to its last offset. It runs under
// the head lock, which the update holds, so no writer appends meanwhile;
// and only in read committed, where it sees every append: a snapshot older
// than the lock would raise them short, and writers would take numbers
// again in the next partition, where no unique index could tell.
func floorsSQL(schema string) []string {
	branches := partitionBranches("OLD.part", func(p int) string {
		return "NEW.position := greatest(NEW.position, OLD.position, (SELECT e.position FROM " + logPart(schema, p) + " e ORDER BY e.position DESC LIMIT 1));\n\t\t" +
			raiseOffsetFloorsSQL(schema, p) + ";"
	})
	head := pgx.Identifier{schema, logHead}.Sanitize()
	function := pgx.Identifier{schema, floorsFunction}.Sanitize()
	return []string{
		`CREATE OR REPLACE FUNCTION ` + function + `() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
	IF current_setting('transaction_isolation') <> 'read committed' THEN
		RAISE EXCEPTION USING ERRCODE = 'serialization_failure',
			MESSAGE = 'pgstore: the change log switches partitions in read committed only, where it sees every append';
	END IF;
` + branches + `	RETURN NEW;
END
$fn$`,
		"DROP TRIGGER IF EXISTS " + floorsTrigger + " ON " + head,
		"CREATE TRIGGER " + floorsTrigger + " BEFORE UPDATE OF part ON " + head + " FOR EACH ROW WHEN (OLD.part IS DISTINCT FROM NEW.part) EXECUTE FUNCTION " + function + "()",
	}
}

// partitionBranches returns the PL/pgSQL IF … ELSIF … END IF that runs, for
// the partition that the expression part names, what body gives for it: a
// statement per partition, of which PL/pgSQL plans and locks only the one it
// runs, where a statement over the partitioned table would lock all four.
func partitionBranches(part string, body func(p int) string) string {
	var b strings.Builder
	for p := range logParts {
		keyword := "ELSIF"
		if p == 0 {
			keyword = "IF"
		}
		fmt.Fprintf(&b, "\t%s %s = %d THEN\n\t\t%s\n", keyword, part, p, body(p))
	}
	b.WriteString("\tEND IF;\n")
	return b.String()
}

// logOffsetIndex names the log's index by table and offset, which logs made
// before writers stopped counting in rows (see the top of this file) lack.
const logOffsetIndex = "pgstore/log_entries_table_offset"

// logIndexesSQL creates the log's indexes: by position, for readers and the
// log's end, and by table and offset, for a table's last offset. Unique in
// each partition (a partitioned table's unique index holds its partition
// key), which is where a writer that took a number again would put it: the
// janitor switches partitions under the head lock, at a version of the head
// that such a writer cannot lock.
func logIndexesSQL(schema string) []string {
	entries := pgx.Identifier{schema, logEntries}.Sanitize()
	return []string{
		"CREATE UNIQUE INDEX IF NOT EXISTS " + pgx.Identifier{"pgstore/log_entries_position"}.Sanitize() + " ON " + entries + " (position, part)",
		"CREATE UNIQUE INDEX IF NOT EXISTS " + pgx.Identifier{logOffsetIndex}.Sanitize() + " ON " + entries + " (tbl, off, part)",
	}
}

// logEndExpr is the last position of the log: floor, the head's position,
// which the head's trigger raises to the log's end when the partition
// switches, or the last position of the partition that has taken the
// appends since. Exact under the head lock, or in a snapshot.
//
// Writers read it from the partition itself (entries is logPart's): a plan
// over the partitioned table would lock every partition at its start, and
// so wait behind the janitor, which holds the partition it empties while it
// waits for the head lock they hold. A reader of the whole log passes the
// partitioned table.
func logEndExpr(floor, entries string) string {
	return "greatest(" + floor + ", (SELECT e.position FROM " + entries + " e ORDER BY e.position DESC LIMIT 1))"
}

// tableOffsetExpr is the last offset of the table that the SQL expression
// tbl names, read from the partition entries that takes the appends (see
// logEndExpr): the table's floor in the offsets table, or its last offset
// in the partition; 0 for a table never logged.
func tableOffsetExpr(schema, entries, tbl string) string {
	return "coalesce(greatest((SELECT f.off FROM " + pgx.Identifier{schema, logOffsets}.Sanitize() + " f WHERE f.tbl = " + tbl + "), " +
		"(SELECT e.off FROM " + entries + " e WHERE e.tbl = " + tbl + " ORDER BY e.off DESC LIMIT 1)), 0)"
}

// intervalLiteral renders a retention as an SQL interval; it is a number of
// microseconds, never text from a caller.
func intervalLiteral(d time.Duration) string {
	return "'" + strconv.FormatInt(d.Microseconds(), 10) + " microseconds'::interval"
}

// notifyRoom is how full the notification queue may be for a log trigger to
// send its wake-up. Above it, readers are left to their polling: a write must
// never fail because some session elsewhere stopped reading its
// notifications and the queue filled (8 GB by default, so between this
// check and the commit nothing fills the other half).
const notifyRoom = 0.5

// logFunctionSQL creates, or replaces, the statement-level trigger function
// that appends a statement's changed rows to the log, in id order, and sends
// the log's wake-up: an empty NOTIFY, which PostgreSQL sends once per
// transaction however many statements repeat it, and only at the commit.
// The head lock is held: the table's head-lock trigger, or the batch's first
// statement, took it.
func logFunctionSQL(schema string, room float64) string {
	s := pgx.Identifier{schema}.Sanitize()
	// Where the log and the table end, read from the partition that takes
	// the appends (see logEndExpr).
	ends := partitionBranches("p", func(p int) string {
		return "SELECT " + logEndExpr("first", logPart(schema, p)) + ", " + tableOffsetExpr(schema, logPart(schema, p), `(TG_TABLE_NAME::text COLLATE "default")`) +
			" INTO first, o;"
	})
	appendRows := "INSERT INTO " + pgx.Identifier{schema, logEntries}.Sanitize() + ` (part, position, tbl, off, op, id, version, val)
			SELECT p, first + r.k, TG_TABLE_NAME, o + r.k, op, r.id, r.version, CASE WHEN op = 'D' THEN NULL ELSE r.val END
			FROM (SELECT row_number() OVER (ORDER BY c.id) AS k, c.id, c.version, c.val FROM changed_rows c) AS r;`
	return fmt.Sprintf(`CREATE OR REPLACE FUNCTION %[1]s.%[2]s() RETURNS trigger LANGUAGE plpgsql AS $fn$
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
	SELECT h.part, h.position INTO p, first FROM %[3]s h;
	IF NOT FOUND THEN
		RETURN NULL;
	END IF;
%[6]s	IF current_setting('transaction_isolation') = 'read committed' THEN
		%[7]s
	ELSE
		-- A snapshot older than the head lock may not see what the writer
		-- that held it before appended: the numbers read are then taken,
		-- and a unique index refuses them. That is a serialization failure,
		-- to retry.
		BEGIN
			%[7]s
		EXCEPTION WHEN unique_violation THEN
			RAISE EXCEPTION USING ERRCODE = 'serialization_failure',
				MESSAGE = 'pgstore: the change log moved on since this transaction''s snapshot was taken';
		END;
	END IF;
	IF pg_notification_queue_usage() < %[5]v THEN
		PERFORM pg_notify('%[4]s', '');
	END IF;
	RETURN NULL;
END
$fn$`, s, logFunction, pgx.Identifier{schema, logHead}.Sanitize(), logChannel(schema), room, ends, appendRows)
}

func headLockFunctionSQL(schema string) string {
	return fmt.Sprintf(`CREATE FUNCTION %s.%s() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
	PERFORM FROM %s FOR UPDATE;
	RETURN NULL;
END
$fn$`, pgx.Identifier{schema}.Sanitize(), headLockFunction, pgx.Identifier{schema, logHead}.Sanitize())
}

// headLockedSetting is the transaction-local setting by which lockHeadSQL
// tells the head-lock triggers that the transaction already holds the head
// of the schema it names. The triggers' WHEN clause then skips the call of
// their function, which costs more than the rest of a one-row write's
// statement: two calls (an upsert fires the INSERT and the UPDATE trigger).
// A session that sets it by hand without the lock gives up only the lock
// order, and meets the deadlock detector.
const headLockedSetting = "pgstore.head_locked"

// headLockTriggerSQL creates a table's head-lock trigger.
func headLockTriggerSQL(schema, table string) string {
	return fmt.Sprintf("CREATE TRIGGER %s BEFORE INSERT OR UPDATE OR DELETE ON %s FOR EACH STATEMENT WHEN (current_setting('%s', true) IS DISTINCT FROM %s) EXECUTE FUNCTION %s.%s()",
		headLockTrigger, pgx.Identifier{schema, table}.Sanitize(), headLockedSetting, quoteLiteral(schema), pgx.Identifier{schema}.Sanitize(), headLockFunction)
}

// rowEvents are the events of a record's rows.
const rowEvents = eventSet(1<<Insert | 1<<Update | 1<<Delete)

// appendDDL appends a table event to the log inside the DDL's transaction,
// which holds the schema's DDL lock. The head is locked first, in a
// statement of its own, since the parts of one statement run in no set
// order.
func appendDDL(ctx context.Context, tx pgx.Tx, schema string, t EventType, table string) error {
	// A log that an earlier pgstore made since this connector started
	// still counts in rows: this append would not.
	if err := upgradeLog(ctx, tx, schema); err != nil {
		return err
	}
	head := pgx.Identifier{schema, logHead}.Sanitize()
	var part int
	if err := tx.QueryRow(ctx, "SELECT part FROM "+head+" FOR UPDATE").Scan(&part); err != nil {
		return err
	}
	entries := logPart(schema, part)
	_, err := tx.Exec(ctx, "INSERT INTO "+entries+" (part, position, tbl, off, op) "+
		"SELECT h.part, "+logEndExpr("h.position", entries)+" + 1, $1, "+tableOffsetExpr(schema, entries, "$1::text")+" + 1, $2 FROM "+head+" h", table, logOps[t])
	if err != nil {
		return err
	}
	_, err = tx.Exec(ctx, "SELECT pg_notify($1, '') WHERE pg_notification_queue_usage() < $2", logChannel(schema), notifyRoom)
	return err
}

// lockHeadSQL takes the log's head lock first thing in a batch's
// transaction. The triggers take it at the first statement's end, after
// that statement's row locks: a batch that then wrote rows another batch
// had locked before it waited for the head would wait in a cycle.
func lockHeadSQL(schema string) string {
	// The setting is computed over the rows already locked: in the scan
	// below the lock, it would be set before the lock is taken.
	return "SELECT set_config('" + headLockedSetting + "', " + quoteLiteral(schema) + ", true) FROM (SELECT FROM " +
		pgx.Identifier{schema, logHead}.Sanitize() + " FOR UPDATE) AS locked"
}

// A logState is where a schema stands with its change log. A log is switched
// on in steps, so that no event falls between the feeds: it is made
// (logStarting), every table gets the log's triggers beside its NOTIFY ones,
// the log is marked active (logOn) in the transaction that tells the NOTIFY
// feed's subscriptions, and only then do the NOTIFY triggers go. Until the
// log is on, the NOTIFY feed is the whole truth; from then on, the log is.
type logState int

const (
	logNone logState = iota
	logStarting
	logOn
)

// readLogState reads where the schema stands with its change log.
func readLogState(ctx context.Context, q interface {
	QueryRow(context.Context, string, ...any) pgx.Row
}, schema string) (logState, error) {
	var exists bool
	err := q.QueryRow(ctx, "SELECT EXISTS (SELECT FROM pg_tables WHERE schemaname = $1 AND tablename = $2)", schema, logHead).Scan(&exists)
	if err != nil || !exists {
		return logNone, err
	}
	var active bool
	if err := q.QueryRow(ctx, "SELECT active FROM "+pgx.Identifier{schema, logHead}.Sanitize()).Scan(&active); err != nil {
		return logNone, err
	}
	if active {
		return logOn, nil
	}
	return logStarting, nil
}

// switchLogOn finishes, where state is logStarting, the switch of a schema
// to a change log made over existing tables (here, or by a connector that
// has not finished or ended before it did): every table gets the log's
// triggers beside its NOTIFY ones, the log goes on, the NOTIFY feed's
// subscriptions (on every node) are told to switch to it, and then the
// NOTIFY triggers go. With follow, the tables get the events the schema
// records (see syncTriggers). It returns where the schema then stands.
func switchLogOn(ctx context.Context, pool *pgxpool.Pool, schema string, state logState, events eventSet, follow bool) (logState, error) {
	if state != logStarting {
		return state, nil
	}
	if err := syncTriggers(ctx, pool, schema, events, follow, logStarting); err != nil {
		return state, err
	}
	if _, err := activateLog(ctx, pool, schema); err != nil {
		return state, err
	}
	if err := syncTriggers(ctx, pool, schema, events, follow, logOn); err != nil {
		return logOn, fmt.Errorf("remove the NOTIFY triggers, now that the change log is on: %w", err)
	}
	return logOn, nil
}

// activateLog marks the schema's log on, and tells the NOTIFY feed's
// subscriptions in the same transaction, once every table appends to it.
// It reports whether this call switched it on.
func activateLog(ctx context.Context, db beginner, schema string) (bool, error) {
	var switched bool
	err := pgx.BeginFunc(ctx, db, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, ddlLockSQL, schema); err != nil {
			return err
		}
		tag, err := tx.Exec(ctx, "UPDATE "+pgx.Identifier{schema, logHead}.Sanitize()+" SET active = true WHERE NOT active")
		if err != nil {
			return err
		}
		switched = tag.RowsAffected() == 1
		return announceLog(ctx, tx, schema)
	})
	return switched, err
}

// A logChoice is what a connector asks of its schema's change log.
type logChoice struct {
	retention time.Duration // WithChangeLog's, recorded in the schema; 0 if not given
	off       bool          // WithoutChangeLog
}

// errLogOn refuses WithoutChangeLog on a schema that has a change log.
var errLogOn = errors.New("WithoutChangeLog: the schema has a change log, and a change log cannot be switched off (DestroySchema removes it with the schema)")

// prepareLog carries out a connector's choice for the schema's change log,
// and reports where the schema then stands with it. Without WithChangeLog or
// WithoutChangeLog, a schema that has no log gets one, with
// DefaultChangeLogRetention, unless WithoutChangeLog was recorded in it or
// its events (the schema's, as recorded) are none: a schema with its feed
// off would get only the head lock's cost from a log. A log made in a schema
// without record tables is on at once: there is no table to bring in line.
// The caller holds the schema's DDL lock.
func prepareLog(ctx context.Context, tx pgx.Tx, schema string, choice logChoice, events eventSet) (logState, error) {
	state, err := readLogState(ctx, tx, schema)
	if err != nil {
		return logNone, err
	}
	settings := pgx.Identifier{schema, settingsTable}.Sanitize()
	if choice.off {
		if state != logNone {
			return state, nil // switched on by another connector: followed (Connect refuses it)
		}
		_, err := tx.Exec(ctx, "INSERT INTO "+settings+" AS s (one, change_log_off) VALUES (true, true) ON CONFLICT (one) DO UPDATE SET change_log_off = true WHERE NOT s.change_log_off")
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Code == "42703" {
			return logNone, fmt.Errorf("WithoutChangeLog: the schema's settings table predates the choice, and the role does not own it to add its column; as its owner, run: %s", addLogOffSQL(schema))
		}
		return logNone, err
	}
	head := pgx.Identifier{schema, logHead}.Sanitize()
	if state != logNone {
		if err := upgradeLog(ctx, tx, schema); err != nil {
			return state, fmt.Errorf("bring the change log of %q up to date: %w", schema, err)
		}
		if choice.retention > 0 {
			_, err = tx.Exec(ctx, "UPDATE "+head+" SET retention = "+intervalLiteral(choice.retention)+
				" WHERE retention <> "+intervalLiteral(choice.retention))
		}
		return state, err
	}
	off, err := logOffRecorded(ctx, tx, schema)
	if err != nil {
		return logNone, err
	}
	if choice.retention == 0 && (off || events == 0) {
		return logNone, nil
	}
	retention := cmp.Or(choice.retention, DefaultChangeLogRetention)
	for _, stmt := range createLogSQL(schema, retention) {
		if _, err := tx.Exec(ctx, stmt); err != nil {
			return logNone, fmt.Errorf("create the change log of %q: %w", schema, err)
		}
	}
	if off {
		if _, err := tx.Exec(ctx, "UPDATE "+settings+" SET change_log_off = false"); err != nil {
			return logNone, err
		}
	}
	var tables bool
	if err := tx.QueryRow(ctx, "SELECT EXISTS ("+listTablesSQL+")", schema).Scan(&tables); err != nil {
		return logNone, err
	}
	if tables {
		return logStarting, nil // the connector brings them in line
	}
	if _, err := tx.Exec(ctx, "UPDATE "+head+" SET active = true"); err != nil {
		return logNone, err
	}
	return logOn, announceLog(ctx, tx, schema)
}

// upgradeLog brings a log made before writers stopped counting in rows (see
// the top of this file) up to date: its indexes, the head's floors trigger,
// and the trigger function that all its tables share. The head's position
// and the offsets rows, which that function kept exact, are then the
// floors. Writers wait at the head lock, and the janitor at its own, until
// the commit: the indexes are built meanwhile, once. The caller holds the
// schema's DDL lock.
//
// The earlier index by position stays: dropping it would wait for every
// reader of the log, a dump among them, with the head held.
func upgradeLog(ctx context.Context, tx pgx.Tx, schema string) error {
	var current bool
	err := tx.QueryRow(ctx, "SELECT EXISTS (SELECT FROM pg_indexes WHERE schemaname = $1 AND indexname = $2)", schema, logOffsetIndex).Scan(&current)
	if err != nil || current {
		return err
	}
	if _, err := tx.Exec(ctx, janitorWaitSQL, schema); err != nil {
		return err
	}
	// A session that holds the log's head or its partitions makes the
	// upgrade fail, and the connector with it, rather than every writer
	// wait behind it for as long as it lasts.
	stmts := []string{"SET LOCAL lock_timeout = '5s'", "SELECT FROM " + pgx.Identifier{schema, logHead}.Sanitize() + " FOR UPDATE"}
	stmts = append(stmts, logIndexesSQL(schema)...)
	stmts = append(stmts, floorsSQL(schema)...)
	stmts = append(stmts, logFunctionSQL(schema, notifyRoom), "SET LOCAL lock_timeout TO DEFAULT")
	for _, stmt := range stmts {
		if _, err := tx.Exec(ctx, stmt); err != nil {
			return err // a role that does not own the tables: Connect's error says what to run
		}
	}
	return nil
}

// logOffRecorded reports whether the schema records WithoutChangeLog: read
// through to_jsonb, so that a settings table without the column (see
// setupSchema) reads as no choice recorded, and a missing row as none.
func logOffRecorded(ctx context.Context, q interface {
	QueryRow(context.Context, string, ...any) pgx.Row
}, schema string) (bool, error) {
	var off bool
	err := q.QueryRow(ctx, "SELECT coalesce((to_jsonb(s) ->> 'change_log_off')::boolean, false) FROM "+
		pgx.Identifier{schema, settingsTable}.Sanitize()+" s").Scan(&off)
	if errors.Is(err, pgx.ErrNoRows) {
		return false, nil
	}
	return off, err
}

// WithChangeLog sets the retention of the schema's change log, and turns the
// log on if the schema has none. The log is the durable change feed, from
// which subscriptions read at their own pace and resume from a cursor (see
// Subscribe and After). Entries are kept for at least one and a half times
// retention, and dropped after about twice it while a connector runs.
//
// The log is a setting of the schema, not of the connector. Without this
// option, a connector follows what the schema records: it uses the schema's
// log, keeps the NOTIFY feed where WithoutChangeLog was recorded, and
// otherwise makes a log with DefaultChangeLogRetention (unless the schema's
// feed is off: WithEvents with no events). A connector given the option
// records its retention. retention must be at least a minute.
func WithChangeLog(retention time.Duration) Option {
	return func(c *config) error {
		if retention < time.Minute {
			return fmt.Errorf("WithChangeLog: retention must be at least 1m, got %v", retention)
		}
		c.changeLog = logChoice{retention: retention}
		return nil
	}
}

// WithoutChangeLog keeps a schema without a change log: its subscriptions
// get the NOTIFY feed, whose events carry no Value or Cursor and which tells
// of a loss with a Resync (see Subscribe). The choice is recorded in the
// schema, so that connectors without WithChangeLog keep the feed too; one
// with WithChangeLog still turns the log on. A change log cannot be switched
// off: on a schema that has one, Connect and New fail.
func WithoutChangeLog() Option {
	return func(c *config) error {
		c.changeLog = logChoice{off: true}
		return nil
	}
}

// A cursor names a position in one log: "<log id>.<position>". The log id
// tells a cursor of another schema, or of a log dropped and made again,
// from one of this log.
type cursor struct {
	log      string // 32 hex digits
	position int64
}

func (cu cursor) String() string { return cu.log + "." + strconv.FormatInt(cu.position, 10) }

// ErrInvalidCursor wraps every error about a cursor that cannot be read from
// the log: malformed, of another log, or beyond the log's end.
var ErrInvalidCursor = errors.New("pgstore: invalid cursor")

// ErrCursorExpired is the Reason of a Resync delivered when a subscription's
// position is older than the log's retention: the entries after it are
// gone. Re-read the records with List or GetMany, then go on from the
// position they return.
var ErrCursorExpired = errors.New("pgstore: cursor older than the change log's retention")

// ErrLogGone is the Reason of a Resync delivered when the log a subscription
// reads was removed (its schema destroyed).
var ErrLogGone = errors.New("pgstore: change log removed")

func parseCursor(s string) (cursor, error) {
	logID, pos, ok := strings.Cut(s, ".")
	if !ok || len(logID) != 32 {
		return cursor{}, fmt.Errorf("%w %q: not a cursor of pgstore's change log", ErrInvalidCursor, s)
	}
	if _, err := hex.DecodeString(logID); err != nil {
		return cursor{}, fmt.Errorf("%w %q: not a cursor of pgstore's change log", ErrInvalidCursor, s)
	}
	n, err := strconv.ParseInt(pos, 10, 64)
	if err != nil || n < 0 {
		return cursor{}, fmt.Errorf("%w %q: its position is not a number of 0 or more", ErrInvalidCursor, s)
	}
	return cursor{log: logID, position: n}, nil
}

// logHeadRow is what a reader needs of the head: the log's identity, its
// end, and the last position retention removed; and the server's clock when
// it was read, so that the times of entries, which are the server's, can be
// told in the client's.
type logHeadRow struct {
	log      string
	position int64
	dropped  int64
	part     int16 // the partition that takes the appends
	now      time.Time
	skew     time.Duration // how far the client's clock is ahead, as readLog measures it
}

func readHead(ctx context.Context, q interface {
	QueryRow(context.Context, string, ...any) pgx.Row
}, schema string) (logHeadRow, error) {
	// The end from the partition taking the appends, which the janitor
	// never empties: a read of the partitioned table would hold all four
	// for as long as the caller's snapshot lasts (List's, GetMany's), and
	// keep the janitor from emptying the oldest.
	var part int
	if err := q.QueryRow(ctx, "SELECT part FROM "+pgx.Identifier{schema, logHead}.Sanitize()).Scan(&part); err != nil {
		return logHeadRow{}, err
	}
	var h logHeadRow
	if err := q.QueryRow(ctx, readHeadSQL(schema, part)).Scan(h.scan()...); err != nil {
		return h, err
	}
	if int(h.part) != part {
		// Rotated in between (outside a snapshot): read it again.
		return readHead(ctx, q, schema)
	}
	return h, nil
}

func (h *logHeadRow) scan() []any { return []any{&h.log, &h.position, &h.dropped, &h.part, &h.now} }

// clientTime is a time of the server's clock in the client's: a lag measured
// against the client's clock is then not off by the difference between the
// two (only by the network's delay, within the skew's measure).
func (h logHeadRow) clientTime(server time.Time) time.Time { return server.Add(h.skew) }

// logChannel is the channel of the log's wake-ups: named for pgstore, so
// that no application channel named like the schema collides with it, and
// hashed, so that a long schema name is not truncated into another's.
func logChannel(schema string) string {
	sum := sha256.Sum256([]byte(schema))
	return "pgstore_log_" + hex.EncodeToString(sum[:12])
}

// A logEntry is one row of the log. A replay holds a few pages of them and
// reads millions, so an entry is small and costs two allocations: its value,
// and text that holds its key and its cursor; the names of tables are
// shared.
type logEntry struct {
	position, offset, version int64
	op                        EventType
	table                     string
	text                      string // key ("table/id", empty for table events), then cursor
	keyLen                    int
	value                     json.RawMessage
	at                        time.Time // when it was appended, by the server's clock
}

// event returns the entry as the event it delivers.
func (e *logEntry) event(schema string) Event {
	ev := Event{Type: e.op, Schema: schema, Table: e.table, Cursor: e.text[e.keyLen:], Offset: e.offset}
	if e.keyLen > 0 {
		ev.Key, ev.ID, ev.Version, ev.Value = e.text[:e.keyLen], e.text[len(e.table)+1:e.keyLen], e.version, e.value
	}
	return ev
}

var opTypes = [256]EventType{'C': CreateTable, 'X': DestroyTable, 'I': Insert, 'U': Update, 'D': Delete}

// A logScanner turns the rows of readPageSQL into entries.
type logScanner struct {
	logID       string
	table       string // the last entry's
	tbl, id, op pgtype.DriverBytes
	val         pgtype.DriverBytes
	digits      [20]byte
}

func (sc *logScanner) scan(rows pgx.Rows, e *logEntry) error {
	if err := rows.Scan(&e.position, &e.offset, &sc.tbl, &sc.id, &sc.op, &e.version, &sc.val, &e.at); err != nil {
		return err
	}
	if len(sc.op) != 1 || opTypes[sc.op[0]] == 0 {
		return fmt.Errorf("pgstore: the change log holds an entry of unknown op %q at %d", sc.op, e.position)
	}
	e.op = opTypes[sc.op[0]]
	if string(sc.tbl) != sc.table {
		sc.table = string(sc.tbl)
	}
	e.table = sc.table
	pos := strconv.AppendInt(sc.digits[:0], e.position, 10)
	e.keyLen = 0
	if e.op != CreateTable && e.op != DestroyTable {
		e.keyLen = len(sc.tbl) + 1 + len(sc.id)
	}
	var b strings.Builder
	b.Grow(e.keyLen + len(sc.logID) + 1 + len(pos))
	if e.keyLen > 0 {
		b.Write(sc.tbl)
		b.WriteByte('/')
		b.Write(sc.id)
	}
	b.WriteString(sc.logID)
	b.WriteByte('.')
	b.Write(pos)
	e.text = b.String()
	e.value = nil
	if sc.val != nil {
		e.value = json.RawMessage(bytes.Clone(sc.val))
	}
	return nil
}

// readHeadSQL reads the log's identity, end, the last position retention
// removed, the partition taking the appends, and the server's clock. With
// part >= 0, the end is read as if that partition took the appends: right
// only if the head says it does.
func readHeadSQL(schema string, part int) string {
	entries := pgx.Identifier{schema, logEntries}.Sanitize()
	if part >= 0 {
		entries = logPart(schema, part)
	}
	return "SELECT replace(log_id::text, '-', ''), " + logEndExpr("h.position", entries) + ", dropped, part, clock_timestamp() FROM " + pgx.Identifier{schema, logHead}.Sanitize() + " h"
}

// readHeadGenericSQL is readHeadSQL that also sets plan_cache_mode to
// force_generic_plan until the end of the transaction: in a batch, for the
// statements after it (see readLog).
func readHeadGenericSQL(schema string, part int) string {
	return readHeadSQL(schema, part) + ", (SELECT set_config('plan_cache_mode', 'force_generic_plan', true)) AS generic"
}

// readPageSQL reads a page of entries after a position ($1, at most $2),
// from the whole log, or with part >= 0 from that partition alone.
func readPageSQL(schema string, part int) string {
	from := pgx.Identifier{schema, logEntries}.Sanitize()
	if part >= 0 {
		from = logPart(schema, part)
	}
	return "SELECT position, off, tbl, id, op::text, coalesce(version, 0), val, at FROM " + from + " WHERE position > $1 ORDER BY position LIMIT $2"
}

// janitorLockSQL elects the one connector that rotates a schema's log;
// janitorWaitSQL waits until no janitor is at it, and keeps them out.
const (
	janitorLockSQL = "SELECT pg_try_advisory_xact_lock(" + janitorKey + ")"
	janitorWaitSQL = "SELECT pg_advisory_xact_lock(" + janitorKey + ")"
	janitorKey     = "hashtextextended('pgstore log janitor ' || $1, 0)"
)

// rotateLog empties the oldest partition of the log and makes it take the
// appends, if half the retention has passed since the last rotation (or
// always, with force), and if no other connector is at it. It reports
// whether it rotated.
func rotateLog(ctx context.Context, db *pgxpool.Pool, schema string, force bool) (rotated bool, err error) {
	// Read committed, whatever the server's default: the head's floors
	// trigger must see every append (see floorsSQL).
	err = pgx.BeginTxFunc(ctx, db, pgx.TxOptions{IsoLevel: pgx.ReadCommitted}, func(tx pgx.Tx) error {
		var elected bool
		if err := tx.QueryRow(ctx, janitorLockSQL, schema).Scan(&elected); err != nil || !elected {
			return err
		}
		head := pgx.Identifier{schema, logHead}.Sanitize()
		var part int
		var due bool
		err := tx.QueryRow(ctx, "SELECT part, now() - rotated_at >= retention / 2 FROM "+head).Scan(&part, &due)
		if err != nil || !(due || force) {
			return err
		}
		// The partition first, and only briefly: a session that reads it
		// (an idle transaction, a dump) makes the rotation wait for the
		// next tick, not every writer of the schema behind the head.
		// Only this janitor, elected above, changes part.
		if _, err := tx.Exec(ctx, "SET LOCAL lock_timeout = '200ms'"); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, "LOCK TABLE "+logPart(schema, (part+1)%logParts)+" IN ACCESS EXCLUSIVE MODE"); err != nil {
			if isLockTimeout(err) {
				return errPartitionBusy
			}
			return err
		}
		if _, err := tx.Exec(ctx, "SET LOCAL lock_timeout = '5s'"); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, "SELECT FROM "+head+" FOR UPDATE"); err != nil {
			return err
		}
		next := (part + 1) % logParts
		var last int64
		if err := tx.QueryRow(ctx, "SELECT coalesce(max(position), 0) FROM "+logPart(schema, next)).Scan(&last); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, "TRUNCATE "+logPart(schema, next)); err != nil {
			return err
		}
		// The head's trigger raises the floors (floorsSQL).
		_, err = tx.Exec(ctx, "UPDATE "+head+" SET part = $1, rotated_at = now(), dropped = greatest(dropped, $2)", next, last)
		rotated = err == nil
		return err
	})
	if errors.Is(err, errPartitionBusy) {
		return false, nil
	}
	return rotated, err
}

// raiseOffsetFloorsSQL raises the floor of every table that has entries in
// the partition part to its last offset there (see floorsSQL). The tables
// are found by skipping through the partition's index by table and offset,
// a descent per table, rather than by reading every entry.
func raiseOffsetFloorsSQL(schema string, part int) string {
	entries := logPart(schema, part)
	return `WITH RECURSIVE t(tbl) AS (
			SELECT (SELECT e.tbl FROM ` + entries + ` e ORDER BY e.tbl LIMIT 1)
			UNION ALL
			SELECT (SELECT e.tbl FROM ` + entries + ` e WHERE e.tbl > t.tbl ORDER BY e.tbl LIMIT 1) FROM t WHERE t.tbl IS NOT NULL)
		INSERT INTO ` + pgx.Identifier{schema, logOffsets}.Sanitize() + ` AS f (tbl, off)
		SELECT t.tbl, (SELECT e.off FROM ` + entries + ` e WHERE e.tbl = t.tbl ORDER BY e.off DESC LIMIT 1) FROM t WHERE t.tbl IS NOT NULL
		ON CONFLICT (tbl) DO UPDATE SET off = excluded.off WHERE f.off < excluded.off`
}

// errPartitionBusy says that the partition to rotate is being read.
var errPartitionBusy = errors.New("the log partition to empty is in use")

func isLockTimeout(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && pgErr.Code == "55P03"
}

// janitorInterval is how often a connector looks whether its schema's log
// is due a rotation: an eighth of the retention, within a second and a
// minute. A connector without WithChangeLog does not know the retention,
// and looks every minute.
func janitorInterval(retention time.Duration) time.Duration {
	if retention == 0 {
		return time.Minute
	}
	return min(max(retention/8, time.Second), time.Minute)
}

// janitorLoop rotates the log of the connector's schema on time, for as long
// as the connector runs; connectors on one schema take turns.
func (c *Connector) janitorLoop(ctx context.Context, every time.Duration) {
	defer close(c.janitorDone)
	t := time.NewTicker(every)
	defer t.Stop()
	measure := func() {
		var usage float64
		if err := c.pool.QueryRow(ctx, "SELECT pg_notification_queue_usage()").Scan(&usage); err == nil {
			c.queueUsage.Store(&measured[float64]{value: usage, at: time.Now()})
		}
		if !c.logged.Load() {
			return
		}
		var size int64
		if err := c.pool.QueryRow(ctx, logSizeSQL(c.cfg.schema)).Scan(&size); err == nil {
			c.logSize.Store(&measured[int64]{value: size, at: time.Now()})
		}
	}
	measure()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		measure()
		if !c.logged.Load() {
			// Another connector may have switched the log on since.
			if state, err := readLogState(ctx, c.pool, c.cfg.schema); err == nil && state != logNone {
				c.logged.Store(true)
			}
			continue
		}
		if _, err := rotateLog(ctx, c.pool, c.cfg.schema, false); err != nil && ctx.Err() == nil && !isUndefinedTable(err) {
			c.cfg.logger.Warn("pgstore: change log retention failed; will try again", "schema", c.cfg.schema, "err", err)
		}
	}
}

// A measured value is one that the janitor measures for Stats, which runs
// no query.
type measured[T any] struct {
	value T
	at    time.Time
}

// logSizeSQL measures the log's partitions, with their indexes and TOAST.
func logSizeSQL(schema string) string { return "SELECT " + logSizeExpr(schema) }

func logSizeExpr(schema string) string {
	parts := make([]string, logParts)
	for p := range logParts {
		parts[p] = fmt.Sprintf("pg_total_relation_size(%s)", quoteLiteral(logPart(schema, p)))
	}
	return strings.Join(parts, " + ")
}
