package pgstore

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5"
)

// A KeyedRecord is a record with its key, as List returns it.
type KeyedRecord struct {
	Key string
	ID  string
	Record
}

// List returns up to limit records of a table whose ids come after afterID,
// in id order (byte order), so that a table is read page by page by passing
// the last id of one page as afterID of the next ("" starts at the first).
// A table that does not exist has no records.
//
// With a change log, List also returns the cursor as of which its records
// are consistent: they are read in one snapshot with the log's position, so
// that Subscribe with After(cursor) delivers every change made after them,
// and none they already hold. Without a log the cursor is "". Unlike Get,
// List reads only what is committed: a buffered write has no position in
// the log yet, and the cursor could not be consistent with it.
func (c *Connector) List(ctx context.Context, table, afterID string, limit int) ([]KeyedRecord, string, error) {
	if c.closing.Load() {
		return nil, "", ErrClosed
	}
	if err := checkIdentifier("table", table); err != nil {
		return nil, "", fmt.Errorf("pgstore: List: %w", err)
	}
	if limit < 1 {
		return nil, "", fmt.Errorf("pgstore: List: limit must be at least 1, got %d", limit)
	}
	var records []KeyedRecord
	at, err := c.snapshot(ctx, func(tx pgx.Tx) error {
		return ifExists(ctx, tx, func(tx pgx.Tx) error {
			return listPage(ctx, tx, c.cfg.schema, table, afterID, limit, &records)
		})
	})
	if err != nil {
		return nil, "", fmt.Errorf("pgstore: List %q: %w", table, err)
	}
	return records, at, nil
}

func listPage(ctx context.Context, tx pgx.Tx, schema, table, afterID string, limit int, records *[]KeyedRecord) error {
	rows, err := tx.Query(ctx, "SELECT id, version, val FROM "+pgx.Identifier{schema, table}.Sanitize()+
		" WHERE id > $1 ORDER BY id LIMIT $2", afterID, limit)
	if err != nil {
		return err
	}
	var r KeyedRecord
	_, err = pgx.ForEachRow(rows, []any{&r.ID, &r.Version, &r.Value}, func() error {
		r.Key = table + "/" + r.ID
		*records = append(*records, r)
		r = KeyedRecord{}
		return nil
	})
	return err
}

// GetMany returns the records under keys, by key; keys that hold no record
// are left out. Like List, it reads one snapshot, returns the change log's
// cursor as of it ("" without a log), and sees only what is committed.
func (c *Connector) GetMany(ctx context.Context, keys []string) (map[string]Record, string, error) {
	if c.closing.Load() {
		return nil, "", ErrClosed
	}
	byTable := make(map[string][]string)
	for _, key := range keys {
		table, id, err := splitKey(key, c.cfg.defaultTable)
		if err != nil {
			return nil, "", err
		}
		byTable[table] = append(byTable[table], id)
	}
	records := make(map[string]Record, len(keys))
	at, err := c.snapshot(ctx, func(tx pgx.Tx) error {
		for table, ids := range byTable {
			err := ifExists(ctx, tx, func(tx pgx.Tx) error {
				rows, err := tx.Query(ctx, "SELECT id, version, val FROM "+pgx.Identifier{c.cfg.schema, table}.Sanitize()+
					" WHERE id = ANY($1::text[])", ids)
				if err != nil {
					return err
				}
				var id string
				var r Record
				_, err = pgx.ForEachRow(rows, []any{&id, &r.Version, &r.Value}, func() error {
					records[table+"/"+id] = r
					r = Record{}
					return nil
				})
				return err
			})
			if err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return nil, "", fmt.Errorf("pgstore: GetMany: %w", err)
	}
	return records, at, nil
}

// snapshot runs read in one repeatable-read snapshot, and returns the change
// log's cursor as of it ("" without a log).
func (c *Connector) snapshot(ctx context.Context, read func(pgx.Tx) error) (string, error) {
	var at string
	err := pgx.BeginTxFunc(ctx, c.pool, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly}, func(tx pgx.Tx) error {
		// The first statement takes the snapshot that the rest reads.
		state, err := readLogState(ctx, tx, c.cfg.schema)
		if err != nil {
			return err
		}
		if state == logOn {
			head, err := readHead(ctx, tx, c.cfg.schema)
			if err != nil {
				return err
			}
			at = cursor{log: head.log, position: head.position}.String()
		}
		return read(tx)
	})
	return at, err
}

// ifExists runs read in a savepoint, so that a table that does not exist
// reads as empty without ending the snapshot.
func ifExists(ctx context.Context, tx pgx.Tx, read func(pgx.Tx) error) error {
	err := pgx.BeginFunc(ctx, tx, read)
	if isUndefinedTable(err) {
		return nil
	}
	return err
}
