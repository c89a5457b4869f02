package mapbroker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/centrifugal/centrifuge"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// beginSnapshot starts a read: one repeatable-read snapshot, so that the
// page and the position it reports are of one moment.
const beginSnapshot = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"

// ReadState returns a page of the channel's entries in key order (byte
// order), and the stream position the page is consistent with: the page
// holds every change up to that position and none after it. Cursor is the
// last key of the previous page; Key reads one entry; Limit -1 reads every
// entry, 0 only the position. A Revision of another epoch than the
// channel's is ErrorUnrecoverablePosition.
func (b *Broker) ReadState(ctx context.Context, ch string, opts centrifuge.MapReadStateOptions) (centrifuge.MapStateResult, error) {
	chOpts, err := b.channelOptions(ch)
	if err != nil {
		return centrifuge.MapStateResult{}, err
	}
	if opts.Key != "" && checkKey(opts.Key) != nil {
		opts.Key = "" // no such key can exist: read the position only
		opts.Limit = 0
	}
	if opts.Cursor != "" && opts.Key == "" {
		if err := checkText("Cursor", opts.Cursor); err != nil {
			return centrifuge.MapStateResult{}, err
		}
	}
	return retryRead(ctx, b, ch, func() (centrifuge.MapStateResult, step, error) {
		return b.readStateOnce(ctx, ch, chOpts, opts)
	})
}

// retryRead runs a read until it is done (see retry), and returns what its
// last attempt read.
func retryRead[R any](ctx context.Context, b *Broker, ch string, once func() (R, step, error)) (R, error) {
	var res R
	err := b.retry(ctx, ch, func() (step, error) {
		var n step
		var err error
		res, n, err = once()
		return n, err
	})
	return res, err
}

func (b *Broker) readStateOnce(ctx context.Context, ch string, chOpts centrifuge.MapChannelOptions, opts centrifuge.MapReadStateOptions) (res centrifuge.MapStateResult, n step, err error) {
	conn, err := b.pool.Acquire(ctx)
	if err != nil {
		return res, done, fmt.Errorf("mapbroker: %w", err)
	}
	defer release(conn)
	wantRows := opts.Key != "" || opts.Limit != 0
	withRows := wantRows && b.tableKnown(ch)
	var m meta
	type row struct {
		id      string
		version int64
		val     []byte
	}
	var rows []row
	var rb pgx.Batch
	rb.Queue(beginSnapshot)
	rb.Queue(b.sql.meta, ch, b.sql.schema).QueryRow(func(r pgx.Row) error { return r.Scan(m.scan()...) })
	limit := opts.Limit
	if withRows {
		var q *pgx.QueuedQuery
		switch {
		case opts.Key != "":
			q = rb.Queue(b.sql.recordRead(ch), []string{opts.Key})
		case limit > 0:
			q = rb.Queue(b.sql.statePage(ch), opts.Cursor, limit+1) // one more: is there a next page?
		default:
			q = rb.Queue(b.sql.statePage(ch), opts.Cursor, nil) // LIMIT NULL: every row
		}
		q.Query(func(rs pgx.Rows) error {
			var r row
			_, err := pgx.ForEachRow(rs, []any{&r.id, &r.version, &r.val}, func() error {
				rows = append(rows, r)
				r = row{}
				return nil
			})
			return err
		})
	}
	rb.Queue("COMMIT")
	err = conn.SendBatch(ctx, &rb).Close()
	switch {
	case isUndefinedTable(err) && withRows:
		b.setKnown(ch, false)
		return res, again, nil
	case err != nil:
		return res, done, fmt.Errorf("mapbroker: read the state of channel %q: %w", ch, err)
	}
	b.setKnown(ch, m.exists())
	switch {
	case m.exists() && wantRows && !withRows:
		return res, again, nil // read again, with the rows
	case m.exists() && !m.ready():
		return res, needLife, nil
	}
	b.keepAlive(ctx, ch, m, chOpts)
	res.Position = m.streamPosition()
	// As centrifuge's memory broker: a revision without an epoch is of
	// no channel life, and only a channel without a table can be at it.
	if r := opts.Revision; r != nil && r.Epoch != res.Position.Epoch && (m.ready() || r.Epoch != "") {
		return res, done, centrifuge.ErrorUnrecoverablePosition
	}
	if limit > 0 && opts.Key == "" && len(rows) > limit {
		rows = rows[:limit]
		res.Cursor = rows[limit-1].id
	}
	for _, r := range rows {
		pub, err := decodeEntry(r.val).publication(r.id, offsetOf(r.version))
		if err != nil {
			return centrifuge.MapStateResult{}, done, err
		}
		res.Publications = append(res.Publications, pub)
	}
	return res, done, nil
}

// ReadStream returns entries of the channel's stream with contiguous
// offsets, and the stream's position. Since reads after a position (before
// it with Reverse); without Since, a read starts at the stream's oldest
// entry (its newest with Reverse). Limit -1 reads to the end, 0 only the
// position.
//
// The stream holds the channel's last StreamSize entries, for StreamTTL
// after the last one (as centrifuge's brokers), of those that pgstore's log
// still holds. A Since of another epoch, or older than what the stream
// holds, is ErrorUnrecoverablePosition, never a read with a hole in it.
func (b *Broker) ReadStream(ctx context.Context, ch string, opts centrifuge.MapReadStreamOptions) (centrifuge.MapStreamResult, error) {
	chOpts, err := b.channelOptions(ch)
	if err != nil {
		return centrifuge.MapStreamResult{}, err
	}
	return retryRead(ctx, b, ch, func() (centrifuge.MapStreamResult, step, error) {
		return b.readStreamOnce(ctx, ch, chOpts, opts.Filter)
	})
}

func (b *Broker) readStreamOnce(ctx context.Context, ch string, chOpts centrifuge.MapChannelOptions, f centrifuge.StreamFilter) (res centrifuge.MapStreamResult, n step, err error) {
	conn, err := b.pool.Acquire(ctx)
	if err != nil {
		return res, done, fmt.Errorf("mapbroker: %w", err)
	}
	defer release(conn)
	var m meta
	var oldest *int64 // the oldest entry of the table that the log still holds
	var rb pgx.Batch
	rb.Queue(beginSnapshot)
	rb.Queue(b.sql.meta, ch, b.sql.schema).QueryRow(func(r pgx.Row) error { return r.Scan(m.scan()...) })
	rb.Queue(b.sql.oldestEntry, ch).
		QueryRow(func(r pgx.Row) error { return r.Scan(&oldest) })
	if f.Limit == 0 {
		rb.Queue("COMMIT") // the position only: no entries to read in the snapshot
	}
	if err := conn.SendBatch(ctx, &rb).Close(); err != nil {
		return res, done, fmt.Errorf("mapbroker: read the stream of channel %q: %w", ch, err)
	}
	if m.exists() && !m.ready() {
		return res, needLife, nil
	}
	b.keepAlive(ctx, ch, m, chOpts)
	res.Position = m.streamPosition()
	if f.Since != nil && f.Since.Epoch != "" && f.Since.Epoch != res.Position.Epoch {
		return centrifuge.MapStreamResult{}, done, centrifuge.ErrorUnrecoverablePosition
	}
	if !m.ready() || f.Limit == 0 {
		return res, done, nil
	}
	top := m.top()
	base := *m.base
	// The stream holds the entries after winLo.
	winLo := max(0, top-int64(chOpts.StreamSize))
	if chOpts.StreamTTL > 0 && (m.lastAt == nil || m.lastAt.Add(chOpts.StreamTTL).Before(m.now)) {
		winLo = top // expired with its last entry, as centrifuge's own streams
	}
	switch {
	case oldest == nil:
		winLo = top // the log holds none of the broker's entries
	case *oldest-base-1 > winLo:
		winLo = *oldest - base - 1
	}
	var lo, hi int64
	if !f.Reverse {
		lo, hi = winLo+1, top
		if f.Since != nil {
			s := int64(min(f.Since.Offset, uint64(top)))
			if s < winLo {
				return centrifuge.MapStreamResult{}, done, centrifuge.ErrorUnrecoverablePosition
			}
			lo = s + 1
		}
		if f.Limit > 0 {
			hi = min(hi, lo+int64(f.Limit)-1)
		}
	} else {
		lo, hi = winLo+1, top
		if f.Since != nil {
			if f.Since.Offset == 0 || f.Since.Offset-1 > uint64(top) {
				return res, done, nil
			}
			hi = int64(f.Since.Offset) - 1
		}
		if f.Limit > 0 {
			lo = max(lo, hi-int64(f.Limit)+1)
		}
	}
	if lo > hi {
		return res, done, nil
	}
	pubs, err := b.readEntries(ctx, conn, ch, m, lo, hi)
	if errors.Is(err, centrifuge.ErrorUnrecoverablePosition) {
		return centrifuge.MapStreamResult{}, done, err
	}
	if err != nil {
		return res, done, fmt.Errorf("mapbroker: read the stream of channel %q: %w", ch, err)
	}
	if f.Reverse {
		slices.Reverse(pubs)
	}
	res.Publications = pubs
	return res, done, nil
}

// readEntries reads the stream's entries lo to hi, in offset order, and
// commits the read's snapshot in the same round trip. An entry that is
// missing (retention dropped it, or it was written to the table without
// the broker, which leaves no index row) makes the read unrecoverable
// rather than holed.
func (b *Broker) readEntries(ctx context.Context, conn *pgxpool.Conn, ch string, m meta, lo, hi int64) ([]*centrifuge.Publication, error) {
	base, epoch := *m.base, m.epoch()
	var pubs []*centrifuge.Publication
	var off, roff int64
	var rowEpoch string
	var tags []byte
	var at time.Time
	var op, id *string
	var val []byte
	want := lo
	var rb pgx.Batch
	rb.Queue(b.sql.streamRead, ch, base+lo, base+hi, m.dropped).Query(func(rows pgx.Rows) error {
		_, err := pgx.ForEachRow(rows, []any{&off, &roff, &rowEpoch, &tags, &at, &op, &id, &val}, func() error {
			if off != base+want || roff != want || rowEpoch != epoch || op == nil || id == nil {
				return centrifuge.ErrorUnrecoverablePosition
			}
			want++
			switch *op {
			case "D":
				pub := &centrifuge.Publication{Key: *id, Removed: true, Offset: uint64(roff), Time: at.UnixMilli()}
				if tags != nil {
					if err := json.Unmarshal(tags, &pub.Tags); err != nil {
						return fmt.Errorf("tags of the removal of %q: %w", *id, err)
					}
				}
				pubs = append(pubs, pub)
			case "I", "U":
				pub, err := decodeEntry(val).publication(*id, uint64(roff))
				if err != nil {
					return err
				}
				pubs = append(pubs, pub)
			default:
				return centrifuge.ErrorUnrecoverablePosition
			}
			tags, val = nil, nil
			return nil
		})
		return err
	})
	rb.Queue("COMMIT")
	if err := conn.SendBatch(ctx, &rb).Close(); err != nil {
		return nil, err
	}
	if want != hi+1 {
		return nil, centrifuge.ErrorUnrecoverablePosition
	}
	return pubs, nil
}
