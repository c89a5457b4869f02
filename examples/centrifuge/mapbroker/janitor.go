package mapbroker

import (
	"context"
	"time"

	"github.com/jackc/pgx/v5"
)

// The janitor removes, every ExpireInterval, the keys whose KeyTTL passed
// (each removal an entry of the stream, as Remove makes) and the channels
// whose MetaTTL passed (as Clear), and every cleanupInterval the broker's
// rows that nothing needs any more. Every node runs one; each piece of work
// is checked again under the locks that make it, so two janitors doing the
// same work do it once.

// Bounds of one round of the janitor.
const (
	expireBatch     = 500
	expireRounds    = 10
	cleanupInterval = time.Minute
)

func (b *Broker) runJanitor() {
	defer close(b.janitor)
	tick := time.NewTicker(b.cfg.ExpireInterval)
	defer tick.Stop()
	cleaned := time.Now()
	for {
		select {
		case <-b.bgCtx.Done():
			return
		case <-tick.C:
		}
		b.expire(b.bgCtx)
		if time.Since(cleaned) >= cleanupInterval {
			b.cleanup(b.bgCtx)
			cleaned = time.Now()
		}
	}
}

// expire removes the keys and the channels that expired.
func (b *Broker) expire(ctx context.Context) {
	for range expireRounds {
		rows, err := b.pool.Query(ctx, b.sql.expiredKeys, expireBatch)
		if err != nil {
			b.warn(ctx, "look for expired keys", err)
			return
		}
		byChannel := make(map[string][]string)
		var ch, id string
		n := 0
		_, err = pgx.ForEachRow(rows, []any{&ch, &id}, func() error {
			n++
			byChannel[ch] = append(byChannel[ch], id)
			return nil
		})
		if err != nil {
			b.warn(ctx, "look for expired keys", err)
			return
		}
		for ch, keys := range byChannel {
			if err := b.expireKeys(ctx, ch, keys); err != nil {
				b.warn(ctx, "remove expired keys of channel "+ch, err)
			}
		}
		if n < expireBatch {
			break
		}
	}
	rows, err := b.pool.Query(ctx, b.sql.expiredChannels, expireBatch)
	if err != nil {
		b.warn(ctx, "look for expired channels", err)
		return
	}
	channels, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		b.warn(ctx, "look for expired channels", err)
		return
	}
	for _, ch := range channels {
		if err := b.drop(ctx, ch, true); err != nil {
			b.warn(ctx, "clear expired channel "+ch, err)
		}
	}
}

// cleanup deletes the stream index rows of entries the log dropped,
// expired idempotency results, and old lives of channels.
func (b *Broker) cleanup(ctx context.Context) {
	for _, stmt := range []string{b.sql.cleanupStream, b.sql.cleanupIdem, b.sql.cleanupEpochs} {
		if _, err := b.pool.Exec(ctx, stmt); err != nil {
			b.warn(ctx, "clean up", err)
		}
	}
}

func (b *Broker) warn(ctx context.Context, what string, err error) {
	if ctx.Err() != nil {
		return // closing
	}
	b.logger.Warn("mapbroker: "+what+" failed; will try again", "schema", b.sql.schema, "err", err)
}
