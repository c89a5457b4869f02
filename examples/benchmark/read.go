package main

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/pgstore/pgstore/internal/benchkit"
)

// getFigures measures figure 3: Get latency from one goroutine, and Get
// throughput from several, over random keys of a table of -records records,
// against the same SELECT on a pgxpool of the same size.
func getFigures(ctx context.Context, e *env) error {
	const figure, table = "get", "get"
	c, err := e.connectLabelled(ctx, figure, e.schema)
	if err != nil {
		return err
	}
	defer c.close()
	d := newDataset(e.s.records, e.s.valueBytes)
	keys := d.keys(table)
	progress("%s: loading %d records", figure, len(keys))
	if _, _, err := c.setAsyncAll(ctx, keys, d.fresh, 1); err != nil {
		return err
	}
	// The ceiling's pool: pgxpool's defaults, like the pool Connect opens.
	pool, err := pgxpool.New(ctx, e.s.url)
	if err != nil {
		return err
	}
	defer pool.Close()
	sql := "SELECT version, val FROM " + ident(e.schema, table) + " WHERE id = $1"

	pgGet := func(ctx context.Context, i int) error {
		rec, err := c.Get(ctx, keys[i])
		if err == nil && rec.Version != 1 {
			err = fmt.Errorf("get %q: version %d, want 1", keys[i], rec.Version)
		}
		return err
	}
	rawGet := func(ctx context.Context, i int) error {
		var version int64
		var val json.RawMessage
		err := pool.QueryRow(ctx, sql, d.ids[i]).Scan(&version, &val)
		if err == nil && version != 1 {
			err = fmt.Errorf("raw get %q: version %d, want 1", d.ids[i], version)
		}
		return err
	}

	rng := rand.New(rand.NewPCG(1, 2))
	sample := make([]int, e.s.gets)
	for i := range sample {
		sample[i] = rng.IntN(len(keys))
	}

	// Latency: one goroutine, the two sides taking turns key by key.
	pgLat := make([]time.Duration, 0, len(sample))
	rawLat := make([]time.Duration, 0, len(sample))
	timed := func(side string, get func(context.Context, int) error, i int, lat *[]time.Duration) error {
		return labelled(ctx, figure, side, func(ctx context.Context) error {
			start := time.Now()
			err := get(ctx, i)
			*lat = append(*lat, time.Since(start))
			return err
		})
	}
	for n, i := range sample {
		first, second := pgGet, rawGet
		firstLat, secondLat := &pgLat, &rawLat
		firstSide, secondSide := "pgstore", "raw"
		if n%2 == 1 {
			first, second, firstLat, secondLat, firstSide, secondSide = second, first, secondLat, firstLat, secondSide, firstSide
		}
		if err := timed(firstSide, first, i, firstLat); err != nil {
			return err
		}
		if err := timed(secondSide, second, i, secondLat); err != nil {
			return err
		}
	}
	pg50, pg99 := benchkit.Percentiles(pgLat)
	raw50, raw99 := benchkit.Percentiles(rawLat)
	e.rep.Set("get_p50", benchkit.Micros(pg50), benchkit.Micros(raw50))
	e.rep.Set("get_p99", benchkit.Micros(pg99), benchkit.Micros(raw99))
	progress("%s latency: pgstore p50 %v p99 %v, raw p50 %v p99 %v", figure, pg50, pg99, raw50, raw99)

	// Throughput: several goroutines, each side in turn, over the sample.
	overSample := func(get func(context.Context, int) error) func(context.Context, int) error {
		return func(ctx context.Context, n int) error { return get(ctx, sample[n]) }
	}
	best := bestOf{}
	for round := range e.s.rounds {
		sides := []func() error{
			func() error {
				return labelled(ctx, figure, "pgstore", func(ctx context.Context) error {
					v, err := benchkit.Concurrently(ctx, e.s.goroutines, len(sample), overSample(pgGet))
					best.add("pgstore", v)
					progress("%s concurrent round %d: pgstore %.0f get/s", figure, round+1, v)
					return err
				})
			},
			func() error {
				return labelled(ctx, figure, "raw", func(ctx context.Context) error {
					v, err := benchkit.Concurrently(ctx, e.s.goroutines, len(sample), overSample(rawGet))
					best.add("raw", v)
					progress("%s concurrent round %d: raw %.0f get/s", figure, round+1, v)
					return err
				})
			},
		}
		if err := runRotated(round, sides); err != nil {
			return err
		}
	}
	e.rep.Set("get_concurrent", best["pgstore"], best["raw"])
	e.rep.Note("get_p50/p99: %d Gets of random keys among %d records, one goroutine, pgstore and raw taking turns key by key; "+
		"ceiling = SELECT version, val FROM t WHERE id = $1 on a pgxpool (pool size %d, like pgstore's own pool)",
		len(sample), len(keys), e.poolSize)
	e.rep.Note("get_concurrent: the same %d Gets from %d goroutines, both sides on pools of %d connections", len(sample), e.s.goroutines, e.poolSize)
	return nil
}
