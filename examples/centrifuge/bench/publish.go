package main

import (
	"context"
	"fmt"
	"github.com/pgstore/pgstore/internal/benchkit"
	"strconv"
	"time"

	"github.com/centrifugal/centrifuge"
)

// deliveryTimeout is how long a throughput round waits for its node to
// deliver every publication it made.
const deliveryTimeout = 30 * time.Second

// publishFigures measures the publish throughput of g concurrent
// publishers, each on keys of its own of one channel, each waiting for its
// publication to be acknowledged: through the pgstore broker, through the
// memory broker, and, as the reference, pgstore's concurrent Set of the
// same keys and data. Each round takes fresh channels and tables; the sides
// take turns, in the reverse order every other round; the best round of
// each counts.
func publishFigures(ctx context.Context, e *env) error {
	n, g := e.s.publications, e.s.goroutines
	data := make([][]byte, n)
	for i := range data {
		data[i] = benchkit.AppendValue(nil, i, 1, e.s.valueBytes)
	}
	channels := make([]string, e.s.rounds)
	for r := range channels {
		channels[r] = fmt.Sprintf("pub_r%d", r+1)
	}
	pg, err := e.openPgNode(ctx, "lat", channels...)
	if err != nil {
		return err
	}
	defer pg.close()
	mem, memHandler, err := openMemoryBroker("lat")
	if err != nil {
		return err
	}
	defer mem.Close(context.Background())
	set, err := e.connect(ctx, e.setSchema)
	if err != nil {
		return err
	}
	defer set.close()

	best := map[string]float64{}
	for round := range e.s.rounds {
		ch := channels[round]
		step := fmt.Sprintf("publish round %d", round+1)
		sides := []func() error{
			func() error {
				// The channel's first publication makes its table: not timed.
				if _, err := pg.broker.Publish(ctx, ch, "warmup", centrifuge.MapPublishOptions{Data: data[0]}); err != nil {
					return fmt.Errorf("pgstore broker: %w", err)
				}
				v, err := benchkit.Concurrently(ctx, g, n, func(ctx context.Context, i int) error {
					_, err := pg.broker.Publish(ctx, ch, key(g, i), centrifuge.MapPublishOptions{Data: data[i]})
					return err
				})
				if err != nil {
					return fmt.Errorf("pgstore broker: %w", err)
				}
				best["broker"] = max(best["broker"], v)
				progress("%s: pgstore broker %.0f pub/s", step, v)
				return checkBroker(ctx, "pgstore broker", pg.broker, pg.handler, ch, n+1)
			},
			func() error {
				if _, err := mem.Publish(ctx, ch, "warmup", centrifuge.MapPublishOptions{Data: data[0]}); err != nil {
					return fmt.Errorf("memory broker: %w", err)
				}
				v, err := benchkit.Concurrently(ctx, g, n, func(ctx context.Context, i int) error {
					_, err := mem.Publish(ctx, ch, key(g, i), centrifuge.MapPublishOptions{Data: data[i]})
					return err
				})
				if err != nil {
					return fmt.Errorf("memory broker: %w", err)
				}
				best["memory"] = max(best["memory"], v)
				progress("%s: memory broker %.0f pub/s", step, v)
				return checkBroker(ctx, "memory broker", mem, memHandler, ch, n+1)
			},
			func() error {
				if err := set.Set(ctx, ch+"/warmup", 1, data[0]); err != nil {
					return fmt.Errorf("pgstore Set: %w", err)
				}
				v, err := benchkit.Concurrently(ctx, g, n, func(ctx context.Context, i int) error {
					return set.Set(ctx, ch+"/"+key(g, i), 1, data[i])
				})
				if err != nil {
					return fmt.Errorf("pgstore Set: %w", err)
				}
				best["set"] = max(best["set"], v)
				progress("%s: pgstore concurrent Set %.0f rec/s", step, v)
				var rows int
				if err := e.raw.QueryRow(ctx, "SELECT count(*) FROM "+ident(e.setSchema, ch)).Scan(&rows); err != nil {
					return fmt.Errorf("pgstore Set: check: %w", err)
				}
				if rows != n+1 {
					return fmt.Errorf("pgstore Set: check: table %q holds %d records, want %d", ch, rows, n+1)
				}
				return nil
			},
		}
		for i := range sides {
			if round%2 == 1 {
				i = len(sides) - 1 - i
			}
			if err := sides[i](); err != nil {
				return fmt.Errorf("%s: %w", step, err)
			}
		}
	}
	e.rep.Set("publish", best["broker"], best["set"])
	e.rep.Set("publish_memory", best["broker"], best["memory"])
	e.rep.Note("publish: %d publications of fresh keys of one channel by %d goroutines, each waiting for its Publish to return "+
		"(MapModePersistent, StreamSize 10000); the pgstore broker's node subscribes to the channel, and every publication is checked "+
		"to reach its handler and the channel's state after the round. Ceiling = pgstore's Set of the same keys and data, %d goroutines, "+
		"each call waiting until its write is durable, change log on, in a schema of its own; and centrifuge's memory map broker on one node. "+
		"Each store's pool has at least %d connections", n, g, g, g+4)
	return nil
}

// key is publisher i%g's key of publication i: distinct for every i.
func key(g, i int) string {
	return "p" + strconv.Itoa(i%g) + "-k" + strconv.Itoa(i)
}

// checkBroker checks that the channel holds want keys and that its node's
// handler got want publications of it.
func checkBroker(ctx context.Context, name string, b centrifuge.MapBroker, h *handler, ch string, want int) error {
	stats, err := b.Stats(ctx, ch)
	if err != nil {
		return fmt.Errorf("%s: check: %w", name, err)
	}
	if stats.NumKeys != want {
		return fmt.Errorf("%s: check: channel %q holds %d keys, want %d", name, ch, stats.NumKeys, want)
	}
	if got := h.waitCount(ch, want, deliveryTimeout); got != want {
		return fmt.Errorf("%s: check: the handler got %d publications of channel %q within %v, want %d", name, got, ch, deliveryTimeout, want)
	}
	return nil
}
