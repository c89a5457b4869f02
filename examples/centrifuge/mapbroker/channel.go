package mapbroker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/centrifugal/centrifuge"
	"github.com/jackc/pgx/v5"

	"github.com/pgstore/pgstore"
)

// A channel's life.
//
// A channel's table is made by pgstore, on the first write to it, with its
// triggers; pgstore offers no other way to make one, so the broker writes
// and deletes a record of its own (sentinelID) through the store. Then, in
// the same transaction that holds the channel's advisory lock exclusive, it
// starts the channel's life: a row of epochsTable with the table's oid and
// its last offset in the log as the base. The stream's offset n is the
// table's offset base+n: the entries of the table's making (CREATE_TABLE,
// the sentinel's) are before it.
//
// The epoch is named after the log's id and the table's last offset before
// it was made ("<log>.<offset>"), which is also the epoch a channel without
// a table reports: reading an empty channel and then publishing to it keeps
// one epoch. Clear drops the table; the table's offsets go on from where
// they were (pgstore keeps them per table name), so the next life's epoch
// differs from every earlier one, and a log made again has another id.

var sentinelValue = json.RawMessage(`{"centrifuge":"creating the channel's table"}`)

// ensureTimeout bounds the making of a channel's table and the start of
// its life, which its caller cannot cut short (see ensure).
const ensureTimeout = 30 * time.Second

// ensure makes a channel's table if it has none, and starts its life if
// it has not started (or the table was made again by someone else).
//
// Once begun, it runs to its end even if ctx is cancelled meanwhile (a
// client that subscribed and went away): stopped between pgstore's writes
// of the sentinel and the start of the life, it would leave a table without
// a life, with the sentinel in it, and the epoch that readers were told
// (named after the table's offset before it was made) would not be the one
// the life takes. A table found without a life all the same (the process
// ended there) loses its sentinel first.
func (b *Broker) ensure(ctx context.Context, ch string) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("mapbroker: channel %q: %w", ch, err)
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), ensureTimeout)
	defer cancel()
	b.ensureMu.Lock()
	defer b.ensureMu.Unlock()
	err := pgx.BeginFunc(ctx, b.pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, b.sql.lockExclusive, lockClass, b.lockKey(ch)); err != nil {
			return err
		}
		m, err := b.readMeta(ctx, tx, ch)
		if err != nil {
			return err
		}
		if m.ready() {
			return nil
		}
		epoch := epochName(m.logID, m.off)
		if m.exists() {
			// A delete of a record that is not there writes nothing.
			if err := b.store.Delete(ctx, ch+"/"+sentinelID); err != nil {
				return fmt.Errorf("remove the sentinel from the channel's table: %w", err)
			}
			if m, err = b.readMeta(ctx, tx, ch); err != nil {
				return err
			}
			if !m.exists() {
				return errors.New("the channel's table was dropped while its life was being started")
			}
		} else {
			// While this transaction holds the lock, no change of the
			// broker writes to the table: only the sentinel is between
			// the offset read above and the base read below.
			if err := b.store.Set(ctx, ch+"/"+sentinelID, 0, sentinelValue); err != nil {
				return fmt.Errorf("create the channel's table: %w", err)
			}
			if err := b.store.Delete(ctx, ch+"/"+sentinelID); err != nil {
				return fmt.Errorf("create the channel's table: %w", err)
			}
			before := m.off
			if m, err = b.readMeta(ctx, tx, ch); err != nil {
				return err
			}
			if !m.exists() {
				return errors.New("pgstore reported the channel's table written, and it does not exist")
			}
			if m.off == before {
				return fmt.Errorf("%w: pgstore's change log did not record the writes to the channel's table (are its INSERT and DELETE events switched off with pgstore.WithEvents?)", ErrUnsupported)
			}
		}
		_, err = tx.Exec(ctx, b.sql.epochInsert, ch, m.off, epoch, *m.tableOID)
		return err
	})
	if err != nil {
		return fmt.Errorf("mapbroker: channel %q: %w", ch, err)
	}
	b.setKnown(ch, true)
	return nil
}

// Clear drops the channel's table (its state) with pgstore's DropTable, and
// forgets its idempotency results and key expiries. The stream's entries
// stay in the log until its retention drops them, but belong to the old
// epoch: the channel's next life has a new one.
func (b *Broker) Clear(ctx context.Context, ch string, _ centrifuge.MapClearOptions) error {
	if err := checkChannel(ch); err != nil {
		return err
	}
	return b.drop(ctx, ch, false)
}

// drop ends a channel's life. With ifExpired, only if its MetaTTL passed.
func (b *Broker) drop(ctx context.Context, ch string, ifExpired bool) error {
	b.ensureMu.Lock()
	defer b.ensureMu.Unlock()
	err := pgx.BeginFunc(ctx, b.pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, b.sql.lockExclusive, lockClass, b.lockKey(ch)); err != nil {
			return err
		}
		if ifExpired {
			var expired bool
			err := tx.QueryRow(ctx, b.sql.metaExpired, ch).Scan(&expired)
			if errors.Is(err, pgx.ErrNoRows) || err == nil && !expired {
				return nil
			}
			if err != nil {
				return err
			}
		}
		m, err := b.readMeta(ctx, tx, ch)
		if err != nil {
			return err
		}
		if m.exists() {
			if err := b.store.DropTable(ctx, ch); err != nil && !errors.Is(err, pgstore.ErrTableNotFound) {
				return err
			}
		}
		for _, stmt := range b.sql.forgetChannel {
			if _, err := tx.Exec(ctx, stmt, ch); err != nil {
				return err
			}
		}
		return nil
	})
	b.setKnown(ch, false)
	if err != nil {
		return fmt.Errorf("mapbroker: clear channel %q: %w", ch, err)
	}
	return nil
}
