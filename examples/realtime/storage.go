package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgstore/pgstore"
)

// Storage is what the server needs from a store: durable writes, reads, and a
// feed of changes made by every node. A *pgstore.Connector is one as it is.
type Storage interface {
	Set(ctx context.Context, key string, version int64, value any) error
	Get(ctx context.Context, key string) (pgstore.Record, error)
	Delete(ctx context.Context, key string) error
	Subscribe(ctx context.Context, handler func(pgstore.Event), filters ...pgstore.Filter) (*pgstore.Subscription, error)
}

var _ Storage = (*pgstore.Connector)(nil)

// A Lister lists the records of a table, in the order of their ids, for the
// "list" message; a table that does not exist has none. A Storage that is not
// a Lister answers "list" with an error.
type Lister interface {
	List(ctx context.Context, table string, limit int) ([]Entry, error)
}

// An Entry is a record with its key.
type Entry struct {
	Key     string          `json:"key"`
	Version int64           `json:"version"`
	Value   json.RawMessage `json:"value"`
}

// PGStore is a pgstore connector that can also list a table.
type PGStore struct {
	*pgstore.Connector
}

var _ Lister = PGStore{}

// List selects the records of a table, reading only what is durable.
func (p PGStore) List(ctx context.Context, table string, limit int) ([]Entry, error) {
	sql := "SELECT id, version, val FROM " + pgx.Identifier{p.Schema(), table}.Sanitize() + " ORDER BY id LIMIT $1"
	rows, err := p.Query(ctx, sql, limit)
	if err == nil {
		var entries []Entry
		entries, err = pgx.CollectRows(rows, func(row pgx.CollectableRow) (Entry, error) {
			var e Entry
			err := row.Scan(&e.Key, &e.Version, &e.Value)
			e.Key = table + "/" + e.Key
			return e, err
		})
		if err == nil {
			return entries, nil
		}
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "42P01" { // undefined_table: nothing written yet
		return nil, nil
	}
	return nil, fmt.Errorf("list %q: %w", table, err)
}
