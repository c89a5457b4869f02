package pgstore

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
)

// PostgreSQL silently truncates identifiers longer than NAMEDATALEN-1 bytes;
// pgstore refuses them instead, so two long names can never merge.
const maxIdentifierBytes = 63

// MaxIDBytes is the longest record id, in bytes, that pgstore accepts. A longer
// id could not be stored in the primary-key index: a btree entry may take at
// most 2704 bytes of an 8 kB page, of which the tuple header and the text
// length take 12.
const MaxIDBytes = 2692

// tableMarker is the comment on every table pgstore creates, so that tables
// made by hand in the same schema are never mistaken for record tables.
const tableMarker = "pgstore records"

var (
	// ErrInvalidKey wraps every error about a malformed record key.
	ErrInvalidKey = errors.New("pgstore: invalid key")
	// ErrInvalidValue wraps every error about a record value that is not
	// JSON that PostgreSQL's jsonb accepts.
	ErrInvalidValue = errors.New("pgstore: invalid value")
)

// checkIdentifier reports why name cannot be a PostgreSQL identifier of the
// given kind ("schema", "table") without being changed by the server.
func checkIdentifier(kind, name string) error {
	switch {
	case name == "":
		return fmt.Errorf("%s name is empty", kind)
	case !utf8.ValidString(name):
		return fmt.Errorf("%s name %s is not valid UTF-8", kind, quoteInput(name))
	case strings.IndexByte(name, 0) >= 0:
		return fmt.Errorf("%s name %s holds a NUL byte", kind, quoteInput(name))
	case len(name) > maxIdentifierBytes:
		return fmt.Errorf("%s name %s is %d bytes, over PostgreSQL's limit of %d",
			kind, quoteInput(name), len(name), maxIdentifierBytes)
	}
	return nil
}

// splitKey splits "table/id" at the first "/". A key without "/" belongs to
// defaultTable.
func splitKey(key, defaultTable string) (table, id string, err error) {
	if key == "" {
		return "", "", fmt.Errorf("%w: key is empty", ErrInvalidKey)
	}
	if !utf8.ValidString(key) {
		return "", "", fmt.Errorf("%w %s: not valid UTF-8", ErrInvalidKey, quoteInput(key))
	}
	if strings.IndexByte(key, 0) >= 0 {
		return "", "", fmt.Errorf("%w %s: holds a NUL byte, which PostgreSQL text cannot store", ErrInvalidKey, quoteInput(key))
	}
	table, id, found := strings.Cut(key, "/")
	if !found {
		table, id = defaultTable, key
	}
	if table == "" {
		return "", "", fmt.Errorf("%w %s: table name (before the first /) is empty", ErrInvalidKey, quoteInput(key))
	}
	if len(table) > maxIdentifierBytes {
		return "", "", fmt.Errorf("%w %s: table name is %d bytes, over PostgreSQL's limit of %d",
			ErrInvalidKey, quoteInput(key), len(table), maxIdentifierBytes)
	}
	if id == "" {
		return "", "", fmt.Errorf("%w %s: id (after the first /) is empty", ErrInvalidKey, quoteInput(key))
	}
	if len(id) > MaxIDBytes {
		return "", "", fmt.Errorf("%w %s: id is %d bytes, over the limit of %d that the primary-key index can hold",
			ErrInvalidKey, quoteInput(key), len(id), MaxIDBytes)
	}
	return table, id, nil
}

// quoteInput quotes user input for an error message, shortening what would
// drown the message.
func quoteInput(s string) string {
	const keep = 80
	if len(s) <= keep {
		return fmt.Sprintf("%q", s)
	}
	cut := keep
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return fmt.Sprintf("%q… (%d bytes)", s[:cut], len(s))
}

// table holds the SQL of one record table, built once with every identifier
// quoted; values always travel as bind parameters.
type table struct {
	name      string
	created   atomic.Bool // known to exist; only then may a batch write to it
	getSQL    string
	upsertSQL string // of array parameters
	stagedSQL string // of the rows in the staging table (see writeStaged)
	deleteSQL string
	lockSQL   string // of rows both set and deleted by a batch
}

func newTable(schema, name string, versionGuard bool) *table {
	ident := pgx.Identifier{schema, name}.Sanitize()
	insert := "INSERT INTO " + ident + " AS t (id, version, val) "
	onConflict := " ON CONFLICT (id) DO UPDATE SET version = excluded.version, val = excluded.val"
	// In id order, the order every connector locks rows in. COPY wrote
	// them in that order, but the heap need not give them back so: rows
	// of different sizes fill the space left on earlier pages.
	arrays := "SELECT * FROM unnest($1::text[], $2::bigint[], $3::jsonb[])"
	staged := "SELECT id, version, val FROM " + stagingTable.Sanitize() + " ORDER BY id"
	t := &table{
		name:      name,
		getSQL:    "SELECT version, val FROM " + ident + " WHERE id = $1",
		upsertSQL: insert + arrays + onConflict,
		stagedSQL: insert + staged + onConflict,
		// Locked in id order, as the upsert locks them: a seq scan or a
		// bitmap scan would take them in the heap's order.
		deleteSQL: "DELETE FROM " + ident + " WHERE id IN (SELECT id FROM " + ident + " WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE)",
		lockSQL:   "SELECT 1 FROM " + ident + " WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE",
	}
	if versionGuard {
		// The statement returns the ids the guard refused, and records
		// them under the attempt's token, so that a batch whose answer is
		// lost still tells which of its sets were refused.
		guarded := func(source, sent, token, tbl string) string {
			return "WITH written AS (" + insert + source + onConflict + " WHERE t.version <= excluded.version RETURNING t.id), " +
				"refused AS (INSERT INTO " + pgx.Identifier{schema, refusedTable}.Sanitize() + " (token, tbl, id) " +
				"SELECT " + token + "::uuid, " + tbl + "::text, s.id FROM " + sent + " WHERE s.id COLLATE \"C\" NOT IN (SELECT id FROM written) RETURNING id) " +
				"SELECT r.id, coalesce((SELECT c.version FROM " + ident + " c WHERE c.id = r.id), 0) FROM refused r"
		}
		t.upsertSQL = guarded(arrays, "unnest($1::text[]) s(id)", "$4", "$5")
		t.stagedSQL = guarded(staged, stagingTable.Sanitize()+" s", "$1", "$2")
	}
	return t
}

// ddlLock serialises pgstore's DDL on one schema across every connector and
// process, so that concurrent first writes create a table exactly once (and
// announce it once).
const ddlLockSQL = "SELECT pg_advisory_xact_lock(hashtextextended('pgstore ' || $1, 0))"

// createTableSQL returns the statements that create a record table with its
// change-feed triggers.
func createTableSQL(schema, name string, events eventSet, state logState) []string {
	ident := pgx.Identifier{schema, name}.Sanitize()
	// The primary key's index is a relation of the schema: named with a "/",
	// which no table name holds, it can never take the name of a table.
	sum := sha256.Sum256([]byte(name))
	pkey := pgx.Identifier{"pkey/" + hex.EncodeToString(sum[:8])}.Sanitize()
	stmts := []string{
		"CREATE TABLE " + ident + " (id text COLLATE \"C\" NOT NULL, version bigint NOT NULL, val jsonb NOT NULL, " +
			"CONSTRAINT " + pkey + " PRIMARY KEY (id))",
		"COMMENT ON TABLE " + ident + " IS '" + tableMarker + "'",
	}
	return append(stmts, triggerSQL(schema, name, events, state)...)
}

// ensureTable creates the record table if it does not exist yet. Under the
// schema's DDL lock it also recreates the schema and the trigger function,
// which another connector may have destroyed since this one connected.
func (c *Connector) ensureTable(ctx context.Context, name string) error {
	schema := c.cfg.schema
	var state logState
	err := pgx.BeginFunc(ctx, c.pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, ddlLockSQL, schema); err != nil {
			return err
		}
		var exists bool
		err := tx.QueryRow(ctx, `SELECT EXISTS (SELECT FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
			WHERE n.nspname = $1 AND c.relname = $2)`, schema, name).Scan(&exists)
		if err != nil || exists {
			return err
		}
		if err := setupSchema(ctx, tx, schema); err != nil {
			return err
		}
		// The schema may be new since Connect (destroyed, and made here
		// again): it gets the log Connect would give it.
		events, err := schemaEvents(ctx, tx, schema, c.cfg.events)
		if err != nil {
			return err
		}
		if state, err = prepareLog(ctx, tx, schema, c.cfg.changeLog, events); err != nil {
			return err
		}
		c.logged.Store(state != logNone)
		for _, stmt := range createTableSQL(schema, name, events, state) {
			if _, err := tx.Exec(ctx, stmt); err != nil {
				return err
			}
		}
		if events.has(CreateTable) {
			return announceDDL(ctx, tx, schema, CreateTable, name)
		}
		return nil
	})
	if err == nil {
		// A log made over tables that some other connector made meanwhile:
		// bring them in line, as Connect would.
		_, err = switchLogOn(ctx, c.pool, schema, state, c.cfg.events, !c.cfg.eventsChosen)
	}
	return err
}

// setupSchema creates the schema and pgstore's trigger function in it, each
// only if missing (replacing a function needs ownership, creating does not).
// The caller holds the schema's DDL lock.
func setupSchema(ctx context.Context, tx pgx.Tx, schema string) error {
	// PostgreSQL checks CREATE on the database before IF NOT EXISTS: ask
	// first, so that a role with only USAGE and CREATE on an existing
	// schema can run pgstore.
	var exists bool
	err := tx.QueryRow(ctx, "SELECT EXISTS (SELECT FROM pg_namespace WHERE nspname = $1)", schema).Scan(&exists)
	if err != nil {
		return err
	}
	if !exists {
		if _, err := tx.Exec(ctx, "CREATE SCHEMA IF NOT EXISTS "+pgx.Identifier{schema}.Sanitize()); err != nil {
			return fmt.Errorf("create schema %q: %w", schema, err)
		}
	}
	err = tx.QueryRow(ctx, "SELECT count(*) = 3 FROM pg_tables WHERE schemaname = $1 AND tablename IN ($2, $3, $4)",
		schema, commitsTable, refusedTable, settingsTable).Scan(&exists)
	if err != nil {
		return err
	}
	if !exists {
		for _, stmt := range markerTablesSQL(schema) {
			if _, err := tx.Exec(ctx, stmt); err != nil {
				return fmt.Errorf("create pgstore's commit markers in %q: %w", schema, err)
			}
		}
	}
	// A schema made before WithoutChangeLog was recorded lacks its column;
	// a role that does not own the table cannot add it, and works without
	// (see prepareLog).
	var owned bool
	err = tx.QueryRow(ctx, `SELECT EXISTS (SELECT FROM pg_attribute WHERE attrelid = c.oid AND attname = 'change_log_off' AND NOT attisdropped),
		pg_has_role(c.relowner, 'USAGE') FROM pg_class c WHERE c.oid = $1::regclass`,
		pgx.Identifier{schema, settingsTable}.Sanitize()).Scan(&exists, &owned)
	if err != nil {
		return err
	}
	if !exists && owned {
		if _, err := tx.Exec(ctx, addLogOffSQL(schema)); err != nil {
			return err
		}
	}
	err = tx.QueryRow(ctx, `SELECT EXISTS (SELECT FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
		WHERE n.nspname = $1 AND p.proname = $2)`, schema, notifyFunction).Scan(&exists)
	if err != nil || exists {
		return err
	}
	if _, err := tx.Exec(ctx, notifyFunctionSQL(schema)); err != nil {
		return fmt.Errorf("create function %q.%s: %w", schema, notifyFunction, err)
	}
	return nil
}

// prepareSchema runs setupSchema and prepareLog in one transaction under the
// DDL lock. It reports where the schema stands with its change log.
//
// With events, it records them as the schema's: the events that connectors
// without WithEvents give the tables they create. It returns the schema's
// events, or fallback where it records none.
func prepareSchema(ctx context.Context, db beginner, schema string, choice logChoice, events *eventSet, fallback eventSet) (state logState, recorded eventSet, err error) {
	err = pgx.BeginFunc(ctx, db, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, ddlLockSQL, schema); err != nil {
			return err
		}
		if err := setupSchema(ctx, tx, schema); err != nil {
			return err
		}
		if events != nil {
			if _, err := tx.Exec(ctx, "INSERT INTO "+pgx.Identifier{schema, settingsTable}.Sanitize()+
				" AS s (one, events) VALUES (true, $1) ON CONFLICT (one) DO UPDATE SET events = excluded.events", int16(*events)); err != nil {
				return err
			}
		}
		if recorded, err = schemaEvents(ctx, tx, schema, fallback); err != nil {
			return err
		}
		if state, err = prepareLog(ctx, tx, schema, choice, recorded); err != nil {
			return err
		}
		for _, stmt := range sweepMarkersSQL(schema) {
			if _, err := tx.Exec(ctx, stmt); err != nil {
				return err
			}
		}
		return nil
	})
	return state, recorded, err
}

type beginner interface {
	Begin(ctx context.Context) (pgx.Tx, error)
}

// settingsTable holds the schema's settings that connectors share: the
// events that WithEvents last recorded, and whether WithoutChangeLog was
// (change_log_off, until a change log is made).
const settingsTable = "pgstore/settings"

func addLogOffSQL(schema string) string {
	return "ALTER TABLE " + pgx.Identifier{schema, settingsTable}.Sanitize() + " ADD COLUMN IF NOT EXISTS change_log_off boolean NOT NULL DEFAULT false"
}

// schemaEvents returns the events the schema records, or else fallback.
func schemaEvents(ctx context.Context, tx pgx.Tx, schema string, fallback eventSet) (eventSet, error) {
	var events *int16
	err := tx.QueryRow(ctx, "SELECT events FROM "+pgx.Identifier{schema, settingsTable}.Sanitize()).Scan(&events)
	switch {
	case errors.Is(err, pgx.ErrNoRows) || isUndefinedTable(err) || err == nil && events == nil:
		return fallback, nil
	case err != nil:
		return 0, err
	}
	return eventSet(*events), nil
}

// ErrSchemaNotFound is returned by DestroySchema for a schema that does not
// exist.
var ErrSchemaNotFound = errors.New("pgstore: schema not found")

// ErrTableNotFound is returned by DropTable for a table that is not one of
// pgstore's in the schema.
var ErrTableNotFound = errors.New("pgstore: table not found")

// listTablesSQL lists pgstore's tables in a schema ($1) with the names of
// their pgstore triggers and the planner's estimate of their rows; tables
// made by hand are left out.
const listTablesSQL = `SELECT c.relname, coalesce(array_agg(t.tgname ORDER BY t.tgname) FILTER (WHERE t.tgname IS NOT NULL), '{}'),
		c.reltuples::bigint
	FROM pg_class c
	JOIN pg_namespace n ON n.oid = c.relnamespace
	LEFT JOIN pg_trigger t ON t.tgrelid = c.oid AND t.tgname LIKE 'pgstore\_%'
	WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') AND obj_description(c.oid, 'pg_class') = '` + tableMarker + `'
	GROUP BY c.relname, c.reltuples ORDER BY c.relname`

type tableTriggers struct {
	name     string
	triggers []string
	estimate int64 // pg_class.reltuples: -1 for a table never analysed
}

func listTables(ctx context.Context, q interface {
	Query(context.Context, string, ...any) (pgx.Rows, error)
}, schema string) ([]tableTriggers, error) {
	rows, err := q.Query(ctx, listTablesSQL, schema)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(row pgx.CollectableRow) (tableTriggers, error) {
		var t tableTriggers
		err := row.Scan(&t.name, &t.triggers, &t.estimate)
		return t, err
	})
}

// syncTriggers gives the existing tables of the schema the triggers of the
// events now configured, so that WithEvents takes effect on existing tables.
// Tables already in line cost nothing but the catalogue query; each table
// that changes has a transaction of its own, so that a schema of thousands of
// tables never holds thousands of locks at once.
//
// Each table's triggers are decided in its transaction, under the DDL lock,
// from what holds then: another connector may have moved the log on since
// state was read (a rolling start switches every node at once), and with
// follow, events are the schema's as recorded then, not as read before.
func syncTriggers(ctx context.Context, db interface {
	beginner
	Query(context.Context, string, ...any) (pgx.Rows, error)
}, schema string, events eventSet, follow bool, state logState) error {
	tables, err := listTables(ctx, db, schema)
	if err != nil {
		return err
	}
	for _, t := range tables {
		if len(triggerChanges(schema, t.name, t.triggers, events, state)) == 0 {
			continue
		}
		err := pgx.BeginFunc(ctx, db, func(tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, ddlLockSQL, schema); err != nil {
				return err
			}
			now, err := readLogState(ctx, tx, schema)
			if err != nil {
				return err
			}
			events := events
			if follow {
				if events, err = schemaEvents(ctx, tx, schema, events); err != nil {
					return err
				}
			}
			var triggers []string
			err = tx.QueryRow(ctx, `SELECT coalesce(array_agg(tgname ORDER BY tgname), '{}') FROM pg_trigger
				WHERE tgrelid = $1::regclass AND tgname LIKE 'pgstore\_%'`, pgx.Identifier{schema, t.name}.Sanitize()).Scan(&triggers)
			if err != nil {
				return err
			}
			state := max(state, now)
			if now == logNone {
				state = logNone // the log went with its schema, made again without one
			}
			for _, stmt := range triggerChanges(schema, t.name, triggers, events, state) {
				if _, err := tx.Exec(ctx, stmt); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil && !isUndefinedTable(err) { // a table dropped meanwhile needs no triggers
			return fmt.Errorf("table %q: %w", t.name, err)
		}
	}
	return nil
}

// triggerChanges returns the statements that give a table that has the
// given pgstore triggers those of events in a schema where the log stands at
// state.
func triggerChanges(schema, table string, triggers []string, events eventSet, state logState) []string {
	var stmts []string
	ident := pgx.Identifier{schema, table}.Sanitize()
	switch has, want := slices.Contains(triggers, headLockTrigger), state != logNone && events&rowEvents != 0; {
	case has && !want:
		stmts = append(stmts, "DROP TRIGGER IF EXISTS "+headLockTrigger+" ON "+ident)
	case !has && want:
		stmts = append(stmts, headLockTriggerSQL(schema, table))
	}
	for _, tr := range rowTriggers {
		for _, kind := range []bool{false, true} {
			name := triggerName(tr.name, kind)
			want := events.has(tr.event) && (kind && state != logNone || !kind && state != logOn)
			switch has := slices.Contains(triggers, name); {
			case has && !want:
				stmts = append(stmts, "DROP TRIGGER IF EXISTS "+name+" ON "+ident)
			case !has && want:
				stmts = append(stmts, rowTriggerSQL(schema, table, tr.name, tr.when, kind))
			}
		}
	}
	return stmts
}

// checkName is the start of every call that takes a schema or table name:
// ErrClosed after Close, or why the name cannot be used.
func (c *Connector) checkName(call, kind, name string) error {
	if c.closing.Load() {
		return ErrClosed
	}
	if err := checkIdentifier(kind, name); err != nil {
		return fmt.Errorf("pgstore: %s: %w", call, err)
	}
	return nil
}

// CreateSchema creates a schema, ready for connectors, if it does not exist,
// with a change log unless the connector has WithoutChangeLog (see
// WithChangeLog). On a schema that exists, it does what Connect does with the
// connector's options: it records WithChangeLog's retention or
// WithoutChangeLog, makes the log where a connector without options would, and
// refuses WithoutChangeLog on a schema that has a log.
func (c *Connector) CreateSchema(ctx context.Context, name string) error {
	if err := c.checkName("CreateSchema", "schema", name); err != nil {
		return err
	}
	if systemSchema(name) {
		return fmt.Errorf("pgstore: CreateSchema: refusing PostgreSQL's own schema %q", name)
	}
	state, events, err := prepareSchema(ctx, c.pool, name, c.cfg.changeLog, nil, allEvents)
	if err == nil && c.cfg.changeLog.off && state != logNone {
		err = errLogOn
	}
	if err == nil {
		// An existing schema's tables, brought in line as a connector on
		// it would.
		_, err = switchLogOn(ctx, c.pool, name, state, events, true)
	}
	if err != nil {
		return fmt.Errorf("pgstore: create schema %q: %w", name, err)
	}
	return nil
}

// systemSchema reports whether PostgreSQL owns the schema.
func systemSchema(name string) bool {
	return name == "public" || name == "information_schema" || strings.HasPrefix(name, "pg_")
}

// DestroySchema drops a schema with all its tables, announcing DESTROY_TABLE
// for each pgstore table when that event is on. It refuses PostgreSQL's own
// schemas and returns ErrSchemaNotFound for one that does not exist. Writes
// still buffered for the connector's own schema create it again when flushed.
//
// The pgstore tables go in steps of a few tables per transaction, each step
// announcing its own, and the schema with the rest of its objects in a last
// one: a single transaction would hold a lock on every table, index and
// trigger at once, and a schema of thousands of tables would fill
// PostgreSQL's shared lock table, failing this call and the transactions of
// every other session of the server. Subscribers following the change log so
// read the DESTROY_TABLE of the tables dropped in steps before the log goes
// (they then get a Resync with ErrLogGone). A call that fails midway leaves
// the tables it dropped dropped, and announced; calling it again finishes.
func (c *Connector) DestroySchema(ctx context.Context, name string) error {
	if err := c.checkName("DestroySchema", "schema", name); err != nil {
		return err
	}
	if systemSchema(name) {
		return fmt.Errorf("pgstore: DestroySchema: refusing to drop the system schema %q", name)
	}
	grace := time.Now().Add(destroyGrace) // for the whole call, however many rounds
	err := destroySchema(ctx, c.pool, name, c.cfg.events, func(ctx context.Context, schema string) {
		c.awaitLogReaders(ctx, schema, grace)
	})
	if err != nil {
		if errors.Is(err, ErrSchemaNotFound) {
			return err
		}
		return fmt.Errorf("pgstore: destroy schema %q: %w", name, err)
	}
	if name == c.cfg.schema {
		c.forgetTables()
	}
	return nil
}

// destroyRounds bounds how often DestroySchema looks again for tables that
// other connectors created while it dropped the ones it found: after that
// many rounds, the last step drops those that remain with the schema, so that
// connectors that keep writing cannot hold it off for ever.
const destroyRounds = 3

// destroySchema drops the schema's pgstore tables in steps, then the
// schema. Each step takes the schema's DDL lock for its own transaction
// only, so that other connectors go on creating tables between the steps:
// those are found in the next round, dropped and announced in their turn.
// The last step drops the schema only when, under the lock, it finds no
// pgstore table left (or after destroyRounds), so that it announces none
// itself: its announcements would go with the log. Before each round after
// the first, settle gives subscribers time to read what the steps announced.
func destroySchema(ctx context.Context, db beginner, schema string, fallback eventSet, settle func(context.Context, string)) error {
	for round := 1; ; round++ {
		if round > 1 {
			settle(ctx, schema)
		}
		var (
			found  []destroyTarget
			budget int
			done   bool
		)
		err := pgx.BeginFunc(ctx, db, func(tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, ddlLockSQL, schema); err != nil {
				return err
			}
			var exists bool
			err := tx.QueryRow(ctx, "SELECT EXISTS (SELECT FROM pg_namespace WHERE nspname = $1), current_setting('max_locks_per_transaction')::int",
				schema).Scan(&exists, &budget)
			if err != nil {
				return err
			}
			if !exists {
				if round == 1 {
					return fmt.Errorf("%w: %q", ErrSchemaNotFound, schema)
				}
				done = true // destroyed meanwhile by another call
				return nil
			}
			if found, err = listDestroyTargets(ctx, tx, schema); err != nil {
				return err
			}
			if len(found) > 0 && round <= destroyRounds {
				return nil
			}
			names := make([]string, len(found))
			for i, t := range found {
				names[i] = t.name
			}
			if err := announceDestroyed(ctx, tx, schema, names, fallback); err != nil {
				return err
			}
			_, err = tx.Exec(ctx, "DROP SCHEMA "+pgx.Identifier{schema}.Sanitize()+" CASCADE")
			done = err == nil
			return err
		})
		if err != nil || done {
			return err
		}
		for _, step := range destroySteps(found, budget) {
			if err := dropTablesStep(ctx, db, schema, step, fallback); err != nil {
				return err
			}
		}
	}
}

// A destroyTarget is a pgstore table to drop, with the number of locks that
// dropping it takes.
type destroyTarget struct {
	name  string
	locks int
}

// destroyTargetsSQL lists pgstore's tables in a schema ($1) with the objects
// that DROP TABLE locks, one entry each in the lock table: the table, its
// row type and array type, its TOAST table and TOAST index, its indexes,
// constraints and triggers.
const destroyTargetsSQL = `SELECT c.relname,
		3 + CASE WHEN c.reltoastrelid <> 0 THEN 2 ELSE 0 END
		+ (SELECT count(*) FROM pg_index i WHERE i.indrelid = c.oid)::int
		+ (SELECT count(*) FROM pg_constraint k WHERE k.conrelid = c.oid)::int
		+ (SELECT count(*) FROM pg_trigger t WHERE t.tgrelid = c.oid)::int
	FROM pg_class c
	JOIN pg_namespace n ON n.oid = c.relnamespace
	WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') AND obj_description(c.oid, 'pg_class') = '` + tableMarker + `'
	ORDER BY c.relname`

func listDestroyTargets(ctx context.Context, tx pgx.Tx, schema string) ([]destroyTarget, error) {
	rows, err := tx.Query(ctx, destroyTargetsSQL, schema)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(row pgx.CollectableRow) (destroyTarget, error) {
		var t destroyTarget
		err := row.Scan(&t.name, &t.locks)
		return t, err
	})
}

// destroySteps groups tables into steps of at most budget locks each, and
// of at least one table. The budget is max_locks_per_transaction: what the
// server sizes its lock table to give every transaction on average, so that
// a step takes no more than its share, however many tables the schema has.
func destroySteps(tables []destroyTarget, budget int) [][]string {
	var steps [][]string
	var step []string
	locks := 0
	for _, t := range tables {
		if len(step) > 0 && locks+t.locks > budget {
			steps = append(steps, step)
			step, locks = nil, 0
		}
		step = append(step, t.name)
		locks += t.locks
	}
	if len(step) > 0 {
		steps = append(steps, step)
	}
	return steps
}

// dropTablesStep drops, in one transaction under the schema's DDL lock, the
// named tables that are still pgstore's (another connector may have dropped
// one since they were listed), announcing each as DropTable does.
func dropTablesStep(ctx context.Context, db beginner, schema string, names []string, fallback eventSet) error {
	return pgx.BeginFunc(ctx, db, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, ddlLockSQL, schema); err != nil {
			return err
		}
		rows, err := tx.Query(ctx, `SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
			WHERE n.nspname = $1 AND c.relname = ANY($2) AND c.relkind IN ('r', 'p')
			AND obj_description(c.oid, 'pg_class') = '`+tableMarker+`' ORDER BY c.relname`, schema, names)
		if err != nil {
			return err
		}
		left, err := pgx.CollectRows(rows, pgx.RowTo[string])
		if err != nil || len(left) == 0 {
			return err
		}
		if err := announceDestroyed(ctx, tx, schema, left, fallback); err != nil {
			return err
		}
		idents := make([]string, len(left))
		for i, name := range left {
			idents[i] = pgx.Identifier{schema, name}.Sanitize()
		}
		// CASCADE, as DROP SCHEMA drops them: with what depends on them.
		_, err = tx.Exec(ctx, "DROP TABLE "+strings.Join(idents, ", ")+" CASCADE")
		return err
	})
}

// announceDestroyed announces DESTROY_TABLE for each named table, when the
// schema has that event on, inside the transaction that drops them.
func announceDestroyed(ctx context.Context, tx pgx.Tx, schema string, names []string, fallback eventSet) error {
	if len(names) == 0 {
		return nil
	}
	events, err := schemaEvents(ctx, tx, schema, fallback)
	if err != nil || !events.has(DestroyTable) {
		return err
	}
	for _, name := range names {
		if err := announceDDL(ctx, tx, schema, DestroyTable, name); err != nil {
			return err
		}
	}
	return nil
}

// DropTable drops a table of the connector's schema, announcing
// DESTROY_TABLE when that event is on. It returns ErrTableNotFound if there is no
// such pgstore table. Writes to it still buffered create it again when
// flushed.
func (c *Connector) DropTable(ctx context.Context, name string) error {
	if err := c.checkName("DropTable", "table", name); err != nil {
		return err
	}
	schema := c.cfg.schema
	err := pgx.BeginFunc(ctx, c.pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, ddlLockSQL, schema); err != nil {
			return err
		}
		var exists bool
		err := tx.QueryRow(ctx, `SELECT EXISTS (SELECT FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
			WHERE n.nspname = $1 AND c.relname = $2 AND obj_description(c.oid, 'pg_class') = '`+tableMarker+`')`,
			schema, name).Scan(&exists)
		if err != nil {
			return err
		}
		if !exists {
			return ErrTableNotFound
		}
		if err := announceDestroyed(ctx, tx, schema, []string{name}, c.cfg.events); err != nil {
			return err
		}
		_, err = tx.Exec(ctx, "DROP TABLE "+pgx.Identifier{schema, name}.Sanitize())
		return err
	})
	if errors.Is(err, ErrTableNotFound) {
		return fmt.Errorf("pgstore: DropTable %q: %w", name, err)
	}
	if err != nil {
		return fmt.Errorf("pgstore: drop table %q: %w", name, err)
	}
	c.mu.Lock()
	if t := c.tables[name]; t != nil {
		t.created.Store(false)
	}
	delete(c.existing, name)
	c.mu.Unlock()
	return nil
}

func (c *Connector) forgetTables() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, t := range c.tables {
		t.created.Store(false)
	}
	clear(c.existing)
}

// GetSchemaOverview returns the number of records in each table of the
// connector's schema. See GetSchemaOverviewOf.
func (c *Connector) GetSchemaOverview(ctx context.Context) (map[string]int64, error) {
	return c.GetSchemaOverviewOf(ctx, c.cfg.schema, false)
}

// GetSchemaOverviewOf returns the number of records in each pgstore table of
// a schema; tables made by hand are left out, and a schema that does not
// exist has none. Buffered writes are not counted.
//
// Counts are exact, which reads every table in full (a few dozen tables per
// statement, so the counts of a large schema are not all of one instant).
// With estimate they come from the planner's statistics instead
// (pg_class.reltuples as of the last VACUUM or ANALYZE, -1 for a table never
// analysed), which costs nothing on schemas of millions of records.
func (c *Connector) GetSchemaOverviewOf(ctx context.Context, schema string, estimate bool) (map[string]int64, error) {
	if err := c.checkName("GetSchemaOverview", "schema", schema); err != nil {
		return nil, err
	}
	overview := make(map[string]int64)
	if estimate {
		tables, err := listTables(ctx, c.pool, schema)
		if err != nil {
			return nil, fmt.Errorf("pgstore: schema overview of %q: %w", schema, err)
		}
		for _, t := range tables {
			overview[t.name] = t.estimate
		}
		return overview, nil
	}
	for attempt := 1; ; attempt++ {
		err := c.countRecords(ctx, schema, overview)
		if err == nil {
			return overview, nil
		}
		if !isUndefinedTable(err) || attempt == 3 { // a table dropped meanwhile: look again
			return nil, fmt.Errorf("pgstore: schema overview of %q: %w", schema, err)
		}
		clear(overview)
	}
}

// countRecords counts the records of every pgstore table of a schema, a
// chunk of tables per statement. Each table read holds two locks (the table
// and its index) until the statement ends, and PostgreSQL's lock table,
// shared by every session, is sized to give each transaction
// max_locks_per_transaction on average: a chunk takes no more than that
// share, as DestroySchema's steps do.
func (c *Connector) countRecords(ctx context.Context, schema string, overview map[string]int64) error {
	tables, err := listTables(ctx, c.pool, schema)
	if err != nil {
		return err
	}
	var share int
	if err := c.pool.QueryRow(ctx, "SELECT current_setting('max_locks_per_transaction')::int").Scan(&share); err != nil {
		return err
	}
	for chunk := range slices.Chunk(tables, max(share/2, 1)) {
		parts := make([]string, len(chunk))
		args := make([]any, len(chunk))
		for i, t := range chunk {
			parts[i] = fmt.Sprintf("SELECT $%d::text, count(*) FROM %s", i+1, pgx.Identifier{schema, t.name}.Sanitize())
			args[i] = t.name
		}
		rows, err := c.pool.Query(ctx, strings.Join(parts, " UNION ALL "), args...)
		if err != nil {
			return err
		}
		var name string
		var count int64
		_, err = pgx.ForEachRow(rows, []any{&name, &count}, func() error {
			overview[name] = count
			return nil
		})
		if err != nil {
			return err
		}
	}
	return nil
}
