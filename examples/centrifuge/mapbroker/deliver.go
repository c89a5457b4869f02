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

// Delivery.
//
// One pgstore subscription follows the schema's change log for the broker
// (see RegisterEventHandler): pgstore calls it once per entry, in the log's
// order, at its own pace, so the publications of a channel reach the node
// in stream order, and a slow node lags instead of dropping any. Every
// node, the publisher's own included, learns of a publication this way, as
// with centrifuge's Redis broker, never from Publish itself: one path, one
// order.
//
// An entry the broker wrote describes itself: a record's envelope holds its
// epoch and its version is its stream offset; a removal's offset, epoch and
// tags are in the broker's stream index. An entry written to the table
// without the broker is mapped to the life its offset falls in.

// deliver is the handler of the broker's log subscription, which receives
// the log's Insert, Update and Delete events, and Resync.
func (b *Broker) deliver(e pgstore.Event) {
	if e.Type == pgstore.Resync {
		// Entries were missed (the subscription fell behind the log's
		// retention). The node's periodic position checks find the gap
		// and have its clients recover.
		b.logger.Warn("mapbroker: publications may have been missed by this node", "schema", e.Schema, "reason", e.Reason)
		return
	}
	if e.ID == sentinelID {
		return
	}
	b.mu.Lock()
	h := b.handler
	_, subscribed := b.subs[e.Table]
	b.mu.Unlock()
	if h == nil || !subscribed {
		return
	}
	d, err := b.publicationOf(b.bgCtx, e)
	if err != nil {
		if b.bgCtx.Err() == nil {
			b.logger.Error("mapbroker: cannot deliver a publication", "channel", e.Table, "key", e.ID, "offset", e.Offset, "err", err)
		}
		return
	}
	if d.pub == nil {
		return
	}
	if err := h.HandlePublication(e.Table, d.pub, d.sp, d.delta, d.prev); err != nil {
		b.logger.Error("mapbroker: the node's handler refused a publication", "channel", e.Table, "key", e.ID, "err", err)
	}
}

type delivery struct {
	pub   *centrifuge.Publication
	sp    centrifuge.StreamPosition
	delta bool
	prev  *centrifuge.Publication
}

// publicationOf turns a log entry into the publication the node receives.
func (b *Broker) publicationOf(ctx context.Context, e pgstore.Event) (delivery, error) {
	var d delivery
	if e.Type != pgstore.Delete {
		en := decodeEntry(e.Value)
		if !en.foreign {
			var err error
			if d.pub, err = en.publication(e.ID, offsetOf(e.Version)); err != nil {
				return d, err
			}
			d.sp = centrifuge.StreamPosition{Offset: d.pub.Offset, Epoch: en.env.Epoch}
			if en.env.Delta {
				d.delta = true
				row, found, err := b.streamRowAt(ctx, e.Table, e.Offset)
				if err != nil {
					return d, err
				}
				if found && row.prev != nil {
					if d.prev, err = decodeEntry(row.prev).publication(e.ID, 0); err != nil {
						return d, err
					}
				}
			}
			return d, nil
		}
	} else {
		row, found, err := b.streamRowAt(ctx, e.Table, e.Offset)
		if err != nil {
			return d, err
		}
		if found {
			d.pub = &centrifuge.Publication{Key: e.ID, Removed: true, Offset: offsetOf(row.roff), Time: row.at.UnixMilli(), Tags: row.tags}
			d.sp = centrifuge.StreamPosition{Offset: d.pub.Offset, Epoch: row.epoch}
			return d, nil
		}
	}
	// Written without the broker: place it in the life its offset falls in.
	var base int64
	var epoch string
	err := b.pool.QueryRow(ctx, b.sql.epochBefore, e.Table, e.Offset).Scan(&base, &epoch)
	if errors.Is(err, pgx.ErrNoRows) {
		return d, nil // before the broker started the channel: not a map entry
	}
	if err != nil {
		return d, err
	}
	d.pub = &centrifuge.Publication{Key: e.ID, Offset: uint64(e.Offset - base), Removed: e.Type == pgstore.Delete}
	if !d.pub.Removed {
		d.pub.Data = e.Value
	}
	d.sp = centrifuge.StreamPosition{Offset: d.pub.Offset, Epoch: epoch}
	return d, nil
}

type streamRow struct {
	epoch string
	roff  int64
	tags  map[string]string
	prev  []byte
	at    time.Time
}

// streamRowAt reads the broker's stream index row of a table offset.
func (b *Broker) streamRowAt(ctx context.Context, ch string, off int64) (streamRow, bool, error) {
	var r streamRow
	var tags []byte
	err := b.pool.QueryRow(ctx, b.sql.streamRow, ch, off).Scan(&r.epoch, &r.roff, &tags, &r.prev, &r.at)
	if errors.Is(err, pgx.ErrNoRows) {
		return r, false, nil
	}
	if err != nil {
		return r, false, err
	}
	if tags != nil {
		if err := json.Unmarshal(tags, &r.tags); err != nil {
			return r, false, fmt.Errorf("tags of the entry at offset %d: %w", off, err)
		}
	}
	return r, true, nil
}
