package pgstore

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
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
	ErrInvalidKey = errors.New("invalid key")
	// ErrInvalidValue wraps every error about a record value that is not
	// JSON that PostgreSQL's jsonb accepts.
	ErrInvalidValue = errors.New("invalid value")
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
	upsertSQL string
	deleteSQL string
}

func newTable(schema, name string, versionGuard bool) *table {
	ident := pgx.Identifier{schema, name}.Sanitize()
	upsert := "INSERT INTO " + ident + " AS t (id, version, val)" +
		" SELECT * FROM unnest($1::text[], $2::bigint[], $3::jsonb[])" +
		" ON CONFLICT (id) DO UPDATE SET version = excluded.version, val = excluded.val"
	if versionGuard {
		// Rows the guard refuses are missing from RETURNING.
		upsert += " WHERE t.version <= excluded.version RETURNING id"
	}
	return &table{
		name:      name,
		getSQL:    "SELECT version, val FROM " + ident + " WHERE id = $1",
		upsertSQL: upsert,
		deleteSQL: "DELETE FROM " + ident + " WHERE id = ANY($1::text[])",
	}
}

// ddlLock serialises pgstore's DDL on one schema across every connector and
// process, so that concurrent first writes create a table exactly once (and
// announce it once).
const ddlLockSQL = "SELECT pg_advisory_xact_lock(hashtextextended('pgstore ' || $1, 0))"

// createTableSQL returns the statements that create a record table with its
// change-feed triggers.
func createTableSQL(schema, name string, events eventSet) []string {
	ident := pgx.Identifier{schema, name}.Sanitize()
	stmts := []string{
		"CREATE TABLE " + ident + " (id text PRIMARY KEY, version bigint NOT NULL, val jsonb NOT NULL)",
		"COMMENT ON TABLE " + ident + " IS '" + tableMarker + "'",
	}
	return append(stmts, triggerSQL(schema, name, events)...)
}

// ensureTable creates the record table if it does not exist yet. Under the
// schema's DDL lock it also recreates the schema and the trigger function,
// which another connector may have destroyed since this one connected.
func (c *Connector) ensureTable(ctx context.Context, name string) error {
	return pgx.BeginFunc(ctx, c.pool, func(tx pgx.Tx) error {
		schema := c.cfg.schema
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
		for _, stmt := range createTableSQL(schema, name, c.cfg.events) {
			if _, err := tx.Exec(ctx, stmt); err != nil {
				return err
			}
		}
		if c.cfg.events.has(CreateTable) {
			return notifyDDL(ctx, tx, schema, CreateTable, name)
		}
		return nil
	})
}

// setupSchema creates the schema and pgstore's trigger function in it, each
// only if missing (replacing a function needs ownership, creating does not).
// The caller holds the schema's DDL lock.
func setupSchema(ctx context.Context, tx pgx.Tx, schema string) error {
	if _, err := tx.Exec(ctx, "CREATE SCHEMA IF NOT EXISTS "+pgx.Identifier{schema}.Sanitize()); err != nil {
		return fmt.Errorf("create schema %q: %w", schema, err)
	}
	var exists bool
	err := tx.QueryRow(ctx, `SELECT EXISTS (SELECT FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
		WHERE n.nspname = $1 AND p.proname = $2)`, schema, notifyFunction).Scan(&exists)
	if err != nil || exists {
		return err
	}
	if _, err := tx.Exec(ctx, notifyFunctionSQL(schema)); err != nil {
		return fmt.Errorf("create function %q.%s: %w", schema, notifyFunction, err)
	}
	return nil
}

// prepareSchema runs setupSchema in its own transaction under the DDL lock.
func prepareSchema(ctx context.Context, db beginner, schema string) error {
	return pgx.BeginFunc(ctx, db, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, ddlLockSQL, schema); err != nil {
			return err
		}
		return setupSchema(ctx, tx, schema)
	})
}

type beginner interface {
	Begin(ctx context.Context) (pgx.Tx, error)
}
