package main

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pgstore/pgstore"
	"github.com/pgstore/pgstore/internal/benchkit"
)

// A rawTechnique is a way to upsert records with plain pgx, on one
// connection, one batch of pgstore.DefaultMaxBatchSize records at a time,
// each batch in one transaction: the ceiling of pgstore's writes.
type rawTechnique struct {
	name  string
	write func(ctx context.Context, conn *pgx.Conn, table string, ids []string, vals []json.RawMessage, version int64) error
}

var rawTechniques = []rawTechnique{
	{"unnest", writeUnnest},
	{"copy", writeCopy},
}

// writeUnnest sends each batch as one array upsert, in a pipeline of its own
// (one round trip, one implicit transaction), as pgstore's flush does.
func writeUnnest(ctx context.Context, conn *pgx.Conn, table string, ids []string, vals []json.RawMessage, version int64) error {
	sql := "INSERT INTO " + table + " AS t (id, version, val)" +
		" SELECT * FROM unnest($1::text[], $2::bigint[], $3::jsonb[])" +
		" ON CONFLICT (id) DO UPDATE SET version = excluded.version, val = excluded.val"
	versions := make([]int64, min(len(ids), pgstore.DefaultMaxBatchSize))
	for i := range versions {
		versions[i] = version
	}
	for off := 0; off < len(ids); off += pgstore.DefaultMaxBatchSize {
		end := min(off+pgstore.DefaultMaxBatchSize, len(ids))
		var b pgx.Batch
		b.Queue(sql, ids[off:end], versions[:end-off], vals[off:end])
		if err := conn.SendBatch(ctx, &b).Close(); err != nil {
			return err
		}
	}
	return nil
}

// writeCopy copies each batch (binary COPY) into a temporary staging table
// that empties itself at commit (ON COMMIT DELETE ROWS), then upserts it into
// the table, in one explicit transaction per batch: begin, COPY, upsert,
// commit. The table receives each batch in one statement, as with
// writeUnnest. Emptying the staging table at commit costs less than a
// TRUNCATE per batch, which gives the table a new file every time.
func writeCopy(ctx context.Context, conn *pgx.Conn, table string, ids []string, vals []json.RawMessage, version int64) error {
	staging := pgx.Identifier{"pg_temp", "pgstore_bench_staging"}
	_, err := conn.Exec(ctx, "CREATE TEMP TABLE IF NOT EXISTS pgstore_bench_staging (id text, version bigint, val jsonb) ON COMMIT DELETE ROWS")
	if err != nil {
		return err
	}
	upsert := "INSERT INTO " + table + " AS t (id, version, val)" +
		" SELECT id, version, val FROM " + staging.Sanitize() +
		" ON CONFLICT (id) DO UPDATE SET version = excluded.version, val = excluded.val"
	for off := 0; off < len(ids); off += pgstore.DefaultMaxBatchSize {
		end := min(off+pgstore.DefaultMaxBatchSize, len(ids))
		err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
			rows := pgx.CopyFromSlice(end-off, func(i int) ([]any, error) {
				return []any{ids[off+i], version, vals[off+i]}, nil
			})
			if _, err := tx.CopyFrom(ctx, staging, []string{"id", "version", "val"}, rows); err != nil {
				return err
			}
			_, err := tx.Exec(ctx, upsert)
			return err
		})
		if err != nil {
			return err
		}
	}
	return nil
}

// rawWrite times one technique on a connection of the raw pool.
func (e *env) rawWrite(ctx context.Context, tech rawTechnique, table string, ids []string, vals []json.RawMessage, version int64) (float64, error) {
	conn, err := e.raw.Acquire(ctx)
	if err != nil {
		return 0, err
	}
	defer conn.Release()
	start := time.Now()
	if err := tech.write(ctx, conn.Conn(), table, ids, vals, version); err != nil {
		return 0, fmt.Errorf("raw %s: %w", tech.name, err)
	}
	return float64(len(ids)) / time.Since(start).Seconds(), nil
}

// setAsyncAll writes every record through SetAsync from one goroutine and
// waits for every Result. It returns the records per second and per flush.
func (c *store) setAsyncAll(ctx context.Context, keys []string, vals []json.RawMessage, version int64) (rate, perFlush float64, err error) {
	results := make([]*pgstore.Result, len(keys))
	flushes := c.batches.n.Load()
	start := time.Now()
	for i, k := range keys {
		results[i] = c.SetAsync(ctx, k, version, vals[i])
	}
	for _, r := range results {
		if err := r.Wait(ctx); err != nil {
			return 0, 0, fmt.Errorf("pgstore: %w", err)
		}
	}
	rate = float64(len(keys)) / time.Since(start).Seconds()
	return rate, float64(len(keys)) / float64(c.batches.n.Load()-flushes), nil
}

// setConcurrent writes every record with Set from g goroutines, each taking
// every g-th record. It returns the records per second and per flush.
func (c *store) setConcurrent(ctx context.Context, g int, keys []string, vals []json.RawMessage, version int64) (rate, perFlush float64, err error) {
	flushes := c.batches.n.Load()
	rate, err = benchkit.Concurrently(ctx, g, len(keys), func(ctx context.Context, i int) error {
		return c.Set(ctx, keys[i], version, vals[i])
	})
	if err != nil {
		return 0, 0, fmt.Errorf("pgstore: %w", err)
	}
	return rate, float64(len(keys)) / float64(c.batches.n.Load()-flushes), nil
}

// writeTables are a figure's tables in one schema: pgstore's own and one per
// raw technique, all created by the connector so that they carry the same
// triggers (or none, with the feed off).
type writeTables struct {
	schema  string
	pgstore string
	raw     []string // by rawTechniques
}

func newWriteTables(ctx context.Context, c *store, schema, name string) (*writeTables, error) {
	t := &writeTables{schema: schema, pgstore: name}
	for _, tech := range rawTechniques {
		t.raw = append(t.raw, "raw_"+name+"_"+tech.name)
	}
	for _, table := range append([]string{t.pgstore}, t.raw...) {
		if err := c.Set(ctx, table+"/_warm", 0, json.RawMessage(`{"warm":true}`)); err != nil {
			return nil, fmt.Errorf("create table %q: %w", table, err)
		}
	}
	return t, nil
}

// reset empties the tables and writes one record into each through its
// writer, so that each side starts a round with its statements prepared.
func (t *writeTables) reset(ctx context.Context, e *env, c *store) error {
	for _, table := range append([]string{t.pgstore}, t.raw...) {
		if _, err := e.raw.Exec(ctx, "TRUNCATE "+ident(t.schema, table)); err != nil {
			return err
		}
	}
	warm := json.RawMessage(`{"warm":true}`)
	if err := c.Set(ctx, t.pgstore+"/_warm", 0, warm); err != nil {
		return err
	}
	for i, tech := range rawTechniques {
		if _, err := e.rawWrite(ctx, tech, ident(t.schema, t.raw[i]), []string{"_warm"}, []json.RawMessage{warm}, 0); err != nil {
			return err
		}
	}
	return nil
}

// check verifies that a table holds n records of the version written, plus
// the warm-up record.
func (e *env) check(ctx context.Context, schema, table string, n int, version int64) error {
	var total, written int
	err := e.raw.QueryRow(ctx, "SELECT count(*), count(*) FILTER (WHERE version = $1) FROM "+ident(schema, table), version).Scan(&total, &written)
	if err != nil {
		return err
	}
	if total != n+1 || written != n {
		return fmt.Errorf("table %q holds %d records, %d of version %d; want %d and %d", table, total, written, version, n+1, n)
	}
	return nil
}

// bestOf keeps, for each side, the best throughput over the rounds.
type bestOf map[string]float64

func (b bestOf) add(side string, v float64) { b[side] = max(b[side], v) }

func (b bestOf) ceiling() (float64, string) {
	best, name := 0.0, ""
	for _, tech := range rawTechniques {
		if b[tech.name] > best {
			best, name = b[tech.name], tech.name
		}
	}
	return best, name
}

// writeFigures measures figure 1: SetAsync from one goroutine, fresh keys
// then updates of the same keys, with the change feed on and off, against
// the raw techniques writing the same records into tables with the same
// triggers.
func writeFigures(ctx context.Context, e *env) error {
	d := newDataset(e.s.records, e.s.valueBytes)
	for _, feed := range []string{"feed", "nofeed", "log"} {
		if err := e.writeFigure(ctx, d, feed); err != nil {
			return err
		}
	}
	for _, phase := range []string{"fresh", "update"} {
		logged, fed := e.rep.Value("write_"+phase+"_log"), e.rep.Value("write_"+phase+"_feed")
		if logged.Measured != nil && fed.Measured != nil {
			e.rep.Note("write_%s_log: the cost of durability, pgstore with the change log / pgstore with the NOTIFY feed = %.3f",
				phase, *logged.Measured / *fed.Measured)
		}
	}
	e.rep.Note("write_*: %d records of %d bytes through SetAsync from one goroutine with default options, every Result waited on; "+
		"ceiling = the faster of COPY into a temp staging table (ON COMMIT DELETE ROWS) + INSERT … SELECT … ON CONFLICT DO UPDATE in one explicit transaction, and INSERT … SELECT FROM unnest(…) ON CONFLICT DO UPDATE in one implicit one, "+
		"in batches of %d (pgstore.DefaultMaxBatchSize), one batch per transaction, one at a time on one connection (pgstore flushes on one connection at a time), "+
		"into a table pgstore created in the same schema (same triggers; none with the feed off)",
		e.s.records, e.s.valueBytes, pgstore.DefaultMaxBatchSize)
	return nil
}

func (e *env) writeFigure(ctx context.Context, d *dataset, feed string) error {
	figure := "write_" + feed
	schema, opts := e.schema, []pgstore.Option(nil)
	switch feed {
	case "nofeed":
		schema, opts = e.noFeed, []pgstore.Option{pgstore.WithEvents()}
	case "log":
		schema, opts = e.logged, []pgstore.Option{pgstore.WithChangeLog(logRetention)}
	}
	c, err := e.connectLabelled(ctx, figure, schema, opts...)
	if err != nil {
		return err
	}
	defer c.close()
	tables, err := newWriteTables(ctx, c, schema, feed)
	if err != nil {
		return err
	}
	keys := d.keys(tables.pgstore)

	phases := []struct {
		name    string
		version int64
		vals    []json.RawMessage
	}{{"fresh", 1, d.fresh}, {"update", 2, d.update}}
	best := map[string]bestOf{"fresh": {}, "update": {}}
	flushSizes := map[string]float64{} // of pgstore's last round
	for round := range e.s.rounds {
		if err := tables.reset(ctx, e, c); err != nil {
			return err
		}
		for _, ph := range phases {
			step := fmt.Sprintf("%s %s round %d", figure, ph.name, round+1)
			sides := []func() error{func() error {
				return labelled(ctx, figure, "pgstore", func(ctx context.Context) error {
					v, perFlush, err := c.setAsyncAll(ctx, keys, ph.vals, ph.version)
					if err == nil {
						best[ph.name].add("pgstore", v)
						flushSizes[ph.name] = perFlush
						progress("%s: pgstore %.0f rec/s, %.0f records per flush", step, v, perFlush)
						err = e.check(ctx, schema, tables.pgstore, len(keys), ph.version)
					}
					return err
				})
			}}
			sides = append(sides, e.rawSides(ctx, figure, step, tables, d.ids, ph.vals, ph.version, best[ph.name])...)
			if err := runRotated(round, sides); err != nil {
				return err
			}
		}
	}
	for _, ph := range phases {
		b := best[ph.name]
		ceiling, tech := b.ceiling()
		e.rep.Set("write_"+ph.name+"_"+feed, b["pgstore"], ceiling)
		e.rep.Note("write_%s_%s: ceiling %s (unnest %.0f rec/s, copy %.0f rec/s); pgstore wrote %.0f records per flush",
			ph.name, feed, tech, b["unnest"], b["copy"], flushSizes[ph.name])
	}
	return nil
}

// rawSides returns a step of a round for each raw technique: write the
// records into its table, keep the best rate, check the table.
func (e *env) rawSides(ctx context.Context, figure, step string, tables *writeTables, ids []string, vals []json.RawMessage, version int64, best bestOf) []func() error {
	var sides []func() error
	for i, tech := range rawTechniques {
		sides = append(sides, func() error {
			return labelled(ctx, figure, "raw", func(ctx context.Context) error {
				v, err := e.rawWrite(ctx, tech, ident(tables.schema, tables.raw[i]), ids, vals, version)
				if err != nil {
					return err
				}
				best.add(tech.name, v)
				progress("%s: raw %s %.0f rec/s", step, tech.name, v)
				return e.check(ctx, tables.schema, tables.raw[i], len(ids), version)
			})
		})
	}
	return sides
}

// runRotated runs the sides of a round, round r starting at side r mod
// len(sides): over as many rounds as sides, each side runs once in every
// place, so that none always runs first after the round's reset, or after
// the others have warmed the server. (Reversing the order in odd rounds
// does that for two sides only: of three, it put the first side first in
// two rounds of three.)
func runRotated(round int, sides []func() error) error {
	for i := range sides {
		if err := sides[(round+i)%len(sides)](); err != nil {
			return err
		}
	}
	return nil
}

// concurrentFigure measures figure 2: fresh records written with Set from
// several goroutines at once, each waiting for its write to be durable,
// against the same work done raw: as many goroutines, each with a
// connection of its own, each upserting one row at a time in autocommit.
func concurrentFigure(ctx context.Context, e *env) error {
	const figure = "write_concurrent"
	d := newDataset(e.s.concurrent, e.s.valueBytes)
	c, err := e.connectLabelled(ctx, figure, e.schema)
	if err != nil {
		return err
	}
	defer c.close()
	tables, err := newWriteTables(ctx, c, e.schema, "conc")
	if err != nil {
		return err
	}
	cfg, err := pgxpool.ParseConfig(e.s.url)
	if err != nil {
		return err
	}
	cfg.MaxConns = int32(e.s.goroutines)
	rawPool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return err
	}
	defer rawPool.Close()
	rawTable := ident(tables.schema, tables.raw[0])
	keys := d.keys(tables.pgstore)
	best := bestOf{}
	flushSize := 0.0 // of pgstore's last round
	for round := range e.s.rounds {
		if err := tables.reset(ctx, e, c); err != nil {
			return err
		}
		step := fmt.Sprintf("%s round %d", figure, round+1)
		sides := []func() error{
			func() error {
				return labelled(ctx, figure, "pgstore", func(ctx context.Context) error {
					v, perFlush, err := c.setConcurrent(ctx, e.s.goroutines, keys, d.fresh, 1)
					if err == nil {
						best.add("pgstore", v)
						flushSize = perFlush
						progress("%s: pgstore %.0f rec/s, %.1f records per flush", step, v, perFlush)
						err = e.check(ctx, e.schema, tables.pgstore, len(keys), 1)
					}
					return err
				})
			},
			func() error {
				return labelled(ctx, figure, "raw", func(ctx context.Context) error {
					v, err := rawConcurrent(ctx, rawPool, rawTable, e.s.goroutines, d.ids, d.fresh, 1)
					if err == nil {
						best.add("raw", v)
						progress("%s: raw %.0f rec/s", step, v)
						err = e.check(ctx, e.schema, tables.raw[0], len(keys), 1)
					}
					return err
				})
			},
		}
		if err := runRotated(round, sides); err != nil {
			return err
		}
	}
	e.rep.Set(figure, best["pgstore"], best["raw"])
	e.rep.Note("write_concurrent: %d fresh records written by %d goroutines calling Set, each call waiting until its write is durable (feed on); "+
		"ceiling = the same work raw: %d goroutines, each on a connection of its own, each upserting one row at a time in autocommit. "+
		"pgstore wrote %.1f records per flush, on one connection",
		len(keys), e.s.goroutines, e.s.goroutines, flushSize)
	return nil
}

// rawConcurrent upserts every record from g goroutines, one row per
// autocommit statement, each goroutine taking every g-th record. It
// returns the records per second.
func rawConcurrent(ctx context.Context, pool *pgxpool.Pool, table string, g int, ids []string, vals []json.RawMessage, version int64) (float64, error) {
	sql := "INSERT INTO " + table + " AS t (id, version, val) VALUES ($1, $2, $3)" +
		" ON CONFLICT (id) DO UPDATE SET version = excluded.version, val = excluded.val"
	return benchkit.Concurrently(ctx, g, len(ids), func(ctx context.Context, i int) error {
		_, err := pool.Exec(ctx, sql, ids[i], version, vals[i])
		return err
	})
}
