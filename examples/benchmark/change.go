package main

import (
	"context"
	"fmt"
	"strings"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/pgstore/pgstore"
	"github.com/pgstore/pgstore/internal/benchkit"
)

// changeWarmup samples are taken and thrown away before the measured ones.
const changeWarmup = 20

// changeTimeout is how long a sample waits for its event before it counts as
// lost.
const changeTimeout = 5 * time.Second

// A changeSide writes one key, one version at a time (sample i writes
// version i), and hears each change.
type changeSide struct {
	*benchkit.Side
	stop func()
}

// changeFigures measures figure 4: the time from calling Set (write interval
// 0) to the subscriber's handler, against a raw autocommit upsert into a
// table with a row-level NOTIFY trigger, heard by a raw listener. The two
// sides take turns, sample by sample.
func changeFigures(ctx context.Context, e *env) error {
	const figure = "change"
	var pg, pgLog, raw *changeSide
	err := labelled(ctx, figure, "pgstore", func(ctx context.Context) (err error) {
		if pg, err = e.pgstoreChangeSide(ctx, false); err != nil {
			return err
		}
		pgLog, err = e.pgstoreChangeSide(ctx, true)
		return err
	})
	if err != nil {
		return err
	}
	defer pg.stop()
	defer pgLog.stop()
	err = labelled(ctx, figure, "raw", func(ctx context.Context) (err error) {
		raw, err = e.rawChangeSide(ctx)
		return err
	})
	if err != nil {
		return err
	}
	defer raw.stop()

	for i := -changeWarmup; i < e.s.changes; i++ {
		sides := []*changeSide{pg, pgLog, raw}
		if i%2 != 0 {
			sides[0], sides[2] = raw, pg
		}
		for _, side := range sides {
			err := labelled(ctx, figure, side.Name, func(ctx context.Context) error {
				return side.Sample(ctx, i+changeWarmup+1, i >= 0, changeTimeout)
			})
			if err != nil {
				return err
			}
		}
	}
	if err := benchkit.CheckHeard(e.rep, "change_*", "changes", e.s.changes, changeTimeout, pg.Side, pgLog.Side, raw.Side); err != nil {
		return err
	}
	pg50, pg99 := benchkit.Percentiles(pg.Event)
	raw50, raw99 := benchkit.Percentiles(raw.Event)
	pgWrite, _ := benchkit.Percentiles(pg.Wrote)
	rawWrite, _ := benchkit.Percentiles(raw.Wrote)
	progress("%s: pgstore p50 %v p99 %v (Set p50 %v); raw p50 %v p99 %v (upsert p50 %v)",
		figure, pg50, pg99, pgWrite, raw50, raw99, rawWrite)
	e.rep.Set("change_p50", benchkit.Micros(pg50), benchkit.Micros(raw50))
	e.rep.Set("change_p99", benchkit.Micros(pg99), benchkit.Micros(raw99))
	log50, log99 := benchkit.Percentiles(pgLog.Event)
	logWrite, _ := benchkit.Percentiles(pgLog.Wrote)
	progress("%s: pgstore with the change log p50 %v p99 %v (Set p50 %v)", figure, log50, log99, logWrite)
	e.rep.Set("change_log_p50", benchkit.Micros(log50), benchkit.Micros(raw50))
	e.rep.Set("change_log_p99", benchkit.Micros(log99), benchkit.Micros(raw99))
	e.rep.Note("change_log_p50/p99: the same, with the change log on, the write through one connector and the subscription on another " +
		"(another node: woken by the NOTIFY sent after the commit, then reading the log)")
	e.rep.Note("change_p50/p99: %d updates of one key, one at a time, timed from the call of Set (write interval 0, feed on) to the subscriber's handler; "+
		"ceiling = autocommit single-row upsert into a table with a row-level AFTER trigger doing pg_notify(channel, NEW.id), "+
		"heard by WaitForNotification on a dedicated pgx.Conn; the sides take turns sample by sample", e.s.changes)
	e.rep.Note("change_*: of which the write until it returned, p50: pgstore Set %.1f µs (%.1f µs with the change log), raw upsert %.1f µs", benchkit.Micros(pgWrite), benchkit.Micros(logWrite), benchkit.Micros(rawWrite))
	return nil
}

// pgstoreChangeSide updates one key with Set and hears each version in a
// subscription's handler.
func (e *env) pgstoreChangeSide(ctx context.Context, logged bool) (*changeSide, error) {
	const table, id = "chg", "k"
	schema, name, opts := e.schema, "pgstore", []pgstore.Option(nil)
	if logged {
		schema, name, opts = e.logged, "pgstore-log", []pgstore.Option{pgstore.WithChangeLog(logRetention)}
	}
	c, err := e.connect(ctx, schema, opts...)
	if err != nil {
		return nil, err
	}
	listener := c
	if logged {
		if listener, err = e.connect(ctx, schema); err != nil {
			c.close()
			return nil, err
		}
	}
	val := benchkit.AppendValue(nil, 0, 1, e.s.valueBytes)
	// Create the table first: its CREATE_TABLE event is not a sample.
	if err := c.Set(ctx, table+"/"+id, 0, val); err != nil {
		c.close()
		return nil, err
	}
	var want atomic.Int64
	side := &changeSide{Side: benchkit.NewSide(name)}
	sub, err := listener.Subscribe(ctx, func(ev pgstore.Event) {
		if (ev.Type == pgstore.Insert || ev.Type == pgstore.Update) && ev.ID == id && ev.Version == want.Load() {
			side.Hear()
		}
	}, pgstore.ForTables(table))
	if err != nil {
		c.close()
		return nil, fmt.Errorf("subscribe: %w", err)
	}
	side.Write = func(ctx context.Context, i int) error {
		version := int64(i)
		want.Store(version)
		return c.Set(ctx, table+"/"+id, version, val)
	}
	side.stop = func() {
		sub.Close(context.Background())
		c.close()
		if listener != c {
			listener.close()
		}
	}
	return side, nil
}

// rawChangeSide upserts one row, autocommit, into a table whose row trigger
// notifies its id, and hears it on a dedicated connection.
func (e *env) rawChangeSide(ctx context.Context) (*changeSide, error) {
	table := ident(e.schema, "rawchg")
	function := ident(e.schema, "rawchg_notify")
	channel := e.schema + "_rawchg"
	literal := "'" + strings.ReplaceAll(channel, "'", "''") + "'"
	for _, stmt := range []string{
		"CREATE SCHEMA IF NOT EXISTS " + pgx.Identifier{e.schema}.Sanitize(),
		"CREATE TABLE " + table + " (id text PRIMARY KEY, version bigint NOT NULL, val jsonb NOT NULL)",
		"CREATE FUNCTION " + function + "() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN PERFORM pg_notify(" + literal + ", NEW.id); RETURN NULL; END$$",
		"CREATE TRIGGER rawchg_notify AFTER INSERT OR UPDATE ON " + table + " FOR EACH ROW EXECUTE FUNCTION " + function + "()",
	} {
		if _, err := e.raw.Exec(ctx, stmt); err != nil {
			return nil, err
		}
	}

	listener, err := pgx.Connect(ctx, e.s.url)
	if err != nil {
		return nil, err
	}
	if _, err := listener.Exec(ctx, "LISTEN "+pgx.Identifier{channel}.Sanitize()); err != nil {
		listener.Close(context.Background())
		return nil, err
	}
	writer, err := e.raw.Acquire(ctx)
	if err != nil {
		listener.Close(context.Background())
		return nil, err
	}
	side := &changeSide{Side: benchkit.NewSide("raw")}
	listenCtx, stopListening := context.WithCancel(ctx)
	listening := make(chan struct{})
	go func() {
		defer close(listening)
		for {
			n, err := listener.WaitForNotification(listenCtx)
			if err != nil {
				return
			}
			if n.Payload == "k" {
				side.Hear()
			}
		}
	}()
	upsert := "INSERT INTO " + table + " (id, version, val) VALUES ($1, $2, $3)" +
		" ON CONFLICT (id) DO UPDATE SET version = excluded.version, val = excluded.val"
	val := benchkit.AppendValue(nil, 0, 1, e.s.valueBytes)
	side.Write = func(ctx context.Context, version int) error {
		_, err := writer.Exec(ctx, upsert, "k", version, val)
		return err
	}
	side.stop = func() {
		stopListening()
		<-listening
		listener.Close(context.Background())
		writer.Release()
	}
	return side, nil
}
