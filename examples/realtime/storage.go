package main

import (
	"context"
	"encoding/json"
	"fmt"

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

// List reads the first records of a table, reading only what is durable.
func (p PGStore) List(ctx context.Context, table string, limit int) ([]Entry, error) {
	records, _, err := p.Connector.List(ctx, table, "", limit)
	if err != nil {
		return nil, fmt.Errorf("list %q: %w", table, err)
	}
	entries := make([]Entry, len(records))
	for i, r := range records {
		entries[i] = Entry{Key: r.Key, Version: r.Version, Value: r.Value}
	}
	return entries, nil
}
