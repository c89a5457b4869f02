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

// A StatsSource is a Storage that reports what it is doing, as
// *pgstore.Connector does: its figures are served at /metrics, and its
// listener's state is part of /healthz. A Storage that is not one has only
// the server's own figures.
type StatsSource interface {
	Stats() pgstore.Stats
}

// A Pinger is a Storage that can tell whether its database answers, for
// /healthz. A Storage that is not one is taken to be connected.
type Pinger interface {
	Ping(ctx context.Context) error
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

var (
	_ Lister      = PGStore{}
	_ StatsSource = PGStore{}
	_ Pinger      = PGStore{}
)

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

// Ping sends an empty statement (as pgx's Ping does) through the connector's
// pool: it answers once a connection can be had and the server responds.
func (p PGStore) Ping(ctx context.Context) error {
	if _, err := p.Connector.Exec(ctx, "-- ping"); err != nil {
		return fmt.Errorf("ping: %w", err)
	}
	return nil
}
