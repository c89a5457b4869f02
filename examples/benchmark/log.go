package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/pgstore/pgstore"
	"github.com/pgstore/pgstore/internal/benchkit"
)

// logRetention is the retention of the log figures' connectors: long enough
// that no rotation happens during a run.
const logRetention = time.Hour

// replayTimeout is how long a replay may take before the run gives up.
const replayTimeout = 5 * time.Minute

// Fan-out: the subscribing connectors, the delivery-latency samples (one
// write every fanoutInterval) and how long the subscribers may take to
// catch up with a write figure's records.
const (
	fanoutSubscribers = 16
	fanoutInterval    = 10 * time.Millisecond
	fanoutCatchUp     = time.Minute
)

// logFigures measures the change log's reading side: a subscription that
// starts far behind (replay), and write throughput while many connectors
// follow the log (fanout).
func logFigures(ctx context.Context, e *env) error {
	if err := replayFigure(ctx, e); err != nil {
		return err
	}
	return fanoutFigure(ctx, e)
}

// cursorPosition returns the position of a change-log cursor
// ("<log id>.<position>").
func cursorPosition(c string) (int64, error) {
	_, pos, ok := strings.Cut(c, ".")
	if !ok {
		return 0, fmt.Errorf("not a change-log cursor: %q", c)
	}
	return strconv.ParseInt(pos, 10, 64)
}

// replayFigure measures how fast a subscription that starts -replay-entries
// entries behind the log's end delivers them, to a handler that does
// nothing, against paging through the same entries raw on one connection.
func replayFigure(ctx context.Context, e *env) error {
	const figure, table = "replay", "replay"
	n := e.s.replayEntries
	c, err := e.connectLabelled(ctx, figure, e.logged, pgstore.WithChangeLog(logRetention))
	if err != nil {
		return err
	}
	defer c.close()

	// The table exists before the start cursor, so that what follows it is
	// the n inserts alone.
	if err := c.Set(ctx, table+"/_warm", 0, json.RawMessage(`{"warm":true}`)); err != nil {
		return err
	}
	_, start, err := c.List(ctx, table, "", 1)
	if err != nil {
		return err
	}
	logBefore, err := e.logDiskBytes(ctx)
	if err != nil {
		return err
	}
	progress("%s: filling the log with %d entries", figure, n)
	fillStart := time.Now()
	err = labelled(ctx, figure, "pgstore", func(ctx context.Context) error {
		buf := make([]byte, 0, e.s.valueBytes)
		key := make([]byte, 0, 32)
		var last *pgstore.Result
		for i := range n {
			if i%4096 == 0 && ctx.Err() != nil {
				return ctx.Err()
			}
			buf = benchkit.AppendValue(buf[:0], i, 1, e.s.valueBytes)
			key = strconv.AppendInt(append(key[:0], table+"/r"...), int64(i), 10)
			last = c.SetAsync(ctx, string(key), 1, json.RawMessage(buf))
		}
		return last.Wait(ctx)
	})
	if err != nil {
		return fmt.Errorf("fill: %w", err)
	}
	fillTime := time.Since(fillStart)
	_, end, err := c.List(ctx, table, "", 1)
	if err != nil {
		return err
	}
	from, err := cursorPosition(start)
	if err != nil {
		return err
	}
	to, err := cursorPosition(end)
	if err != nil {
		return err
	}
	if to-from != int64(n) {
		return fmt.Errorf("the log holds %d entries after the start cursor, want %d (some writes failed?)", to-from, n)
	}
	progress("%s: filled in %v (%.0f rec/s); the log runs from %d to %d", figure, fillTime.Round(time.Millisecond),
		float64(n)/fillTime.Seconds(), from, to)
	logAfter, err := e.logDiskBytes(ctx)
	if err != nil {
		return err
	}
	var tableBytes int64
	if err := e.raw.QueryRow(ctx, "SELECT pg_total_relation_size($1::regclass)", ident(e.logged, table)).Scan(&tableBytes); err != nil {
		return err
	}
	perMillion := func(b int64) float64 { return float64(b) / float64(n) * 1e6 / (1 << 20) }
	e.rep.Note("log_disk: the %d inserts of the replay figure (%d-byte values) grew the change log on disk by %.0f MB, %.0f MB per million changes (heap, index and TOAST); "+
		"the record table holding them takes %.0f MB, %.0f MB per million (MB = 2^20 bytes)",
		n, e.s.valueBytes, float64(logAfter-logBefore)/(1<<20), perMillion(logAfter-logBefore), float64(tableBytes)/(1<<20), perMillion(tableBytes))

	// Open the connector's listening connection, and read the entries once
	// untimed, so that neither side reads them first from a cold cache.
	warm, err := c.Subscribe(ctx, func(pgstore.Event) {})
	if err != nil {
		return err
	}
	warm.Close(context.Background())
	if _, err := e.rawReplay(ctx, from, to); err != nil {
		return err
	}

	best := bestOf{}
	// A round takes about a second: best of three at least, even in a
	// quick run, for a figure that one busy moment can halve.
	for round := range max(e.s.rounds, 3) {
		step := fmt.Sprintf("%s round %d", figure, round+1)
		sides := []func() error{
			func() error {
				return labelled(ctx, figure, "pgstore", func(ctx context.Context) error {
					v, err := replaySubscription(ctx, c, start, end, n)
					if err == nil {
						best.add("pgstore", v)
						progress("%s: pgstore %.0f ev/s", step, v)
					}
					return err
				})
			},
			func() error {
				return labelled(ctx, figure, "raw", func(ctx context.Context) error {
					v, err := e.rawReplay(ctx, from, to)
					if err == nil {
						best.add("raw", v)
						progress("%s: raw %.0f ev/s", step, v)
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
	e.rep.Note("replay: a subscription started with After(cursor) %d entries behind the log's end (inserts of %d-byte values, written untimed with SetAsync at %.0f rec/s), "+
		"timed from Subscribe until the handler (which does nothing) gets the last entry; "+
		"ceiling = SELECT position, off, tbl, id, op, version, val FROM the log WHERE position > $1 ORDER BY position LIMIT 500, page after page on one connection, every column scanned",
		n, e.s.valueBytes, float64(n)/fillTime.Seconds())
	return nil
}

// replaySubscription subscribes after start and returns the events per
// second until the event at end arrives.
func replaySubscription(ctx context.Context, c *store, start, end string, n int) (float64, error) {
	done := make(chan struct{})
	var got int
	var bad atomic.Pointer[pgstore.Event]
	t0 := time.Now()
	sub, err := c.Subscribe(ctx, func(ev pgstore.Event) {
		got++
		if ev.Type == pgstore.Resync {
			bad.CompareAndSwap(nil, &ev)
		}
		if ev.Cursor == end {
			close(done)
		}
	}, pgstore.After(start))
	if err != nil {
		return 0, err
	}
	timer := time.NewTimer(replayTimeout)
	defer timer.Stop()
	select {
	case <-done:
	case <-timer.C:
		sub.Close(context.Background())
		return 0, fmt.Errorf("pgstore: the last of %d entries not delivered within %v", n, replayTimeout)
	case <-ctx.Done():
		sub.Close(context.Background())
		return 0, ctx.Err()
	}
	elapsed := time.Since(t0)
	sub.Close(context.Background())
	if ev := bad.Load(); ev != nil {
		return 0, fmt.Errorf("pgstore: Resync during the replay: %v", ev.Reason)
	}
	if got != n {
		return 0, fmt.Errorf("pgstore: %d events delivered, want %d", got, n)
	}
	return float64(n) / elapsed.Seconds(), nil
}

// rawReplay reads the log's entries after from up to to, a page of 500 at a
// time, on one connection, and returns the entries per second.
func (e *env) rawReplay(ctx context.Context, from, to int64) (float64, error) {
	conn, err := e.raw.Acquire(ctx)
	if err != nil {
		return 0, err
	}
	defer conn.Release()
	sql := rawPageSQL(e.logged)
	var entry rawEntry
	dest := entry.dest()
	t0 := time.Now()
	pos, read := from, 0
	for pos < to {
		rows, err := conn.Query(ctx, sql, pos)
		if err != nil {
			return 0, fmt.Errorf("raw: %w", err)
		}
		page := 0
		for rows.Next() {
			if err := rows.Scan(dest...); err != nil {
				rows.Close()
				return 0, fmt.Errorf("raw: %w", err)
			}
			pos = entry.position
			page++
		}
		if err := rows.Err(); err != nil {
			return 0, fmt.Errorf("raw: %w", err)
		}
		if page == 0 {
			return 0, fmt.Errorf("raw: the log ends at %d, want %d", pos, to)
		}
		read += page
	}
	elapsed := time.Since(t0)
	if want := int(to - from); read != want {
		return 0, fmt.Errorf("raw: read %d entries, want %d", read, want)
	}
	return float64(read) / elapsed.Seconds(), nil
}

// fanoutFigure measures SetAsync throughput from one goroutine, fresh keys,
// on a logged schema that fanoutSubscribers other connectors (each on a pool
// of its own) follow, against the same with one of them following; then the
// delivery latency to all of them.
func fanoutFigure(ctx context.Context, e *env) error {
	const figure = "fanout"
	opt := pgstore.WithChangeLog(logRetention)
	c, err := e.connectLabelled(ctx, figure, e.logged, opt)
	if err != nil {
		return err
	}
	defer c.close()
	subs := make([]*store, 0, fanoutSubscribers)
	defer func() {
		var wg sync.WaitGroup
		for _, s := range subs {
			wg.Go(s.close)
		}
		wg.Wait()
	}()
	for range fanoutSubscribers {
		s, err := e.connectLabelled(ctx, figure, e.logged, opt)
		if err != nil {
			return err
		}
		subs = append(subs, s)
	}

	d := newDataset(e.s.records, e.s.valueBytes)
	best := bestOf{}
	catchUp := map[string]time.Duration{} // of the last round
	flushSizes := map[string]float64{}
	// The ceiling of the readers' own cost: the same writes while as many
	// raw readers follow the log, each on a connection of its own, with
	// the best raw technique (LISTEN, then the paged SELECT of replay).
	sideNames := []string{"16", "1", "16 raw"}
	for round := range e.s.rounds {
		var sides []func() error
		for _, name := range sideNames {
			n, raw := fanoutSubscribers, strings.HasSuffix(name, "raw")
			if name == "1" {
				n = 1
			}
			follow := func(ctx context.Context, table string, want int64, heard func()) (stop func(), err error) {
				if raw {
					return e.rawFollowers(ctx, n, table, want, heard)
				}
				return pgstoreFollowers(ctx, subs[:n], table, want, heard)
			}
			sides = append(sides, func() error {
				return labelled(ctx, figure, "pgstore", func(ctx context.Context) error {
					step := fmt.Sprintf("%s round %d, %s subscriber(s)", figure, round+1, name)
					table := fmt.Sprintf("fan%s_r%d", strings.ReplaceAll(name, " ", ""), round+1)
					v, perFlush, lag, err := e.fanoutWrite(ctx, c, n, follow, table, d)
					if err != nil {
						return fmt.Errorf("%s: %w", step, err)
					}
					best.add(name, v)
					catchUp[name], flushSizes[name] = lag, perFlush
					progress("%s: %.0f rec/s, %.0f records per flush, subscribers caught up %v after the last write",
						step, v, perFlush, lag.Round(time.Millisecond))
					return nil
				})
			})
		}
		if err := runRotated(round, sides); err != nil {
			return err
		}
	}
	with16, with1, withRaw := best["16"], best["1"], best["16 raw"]
	e.rep.Set(figure, with16, with1)
	e.rep.Set("fanout_raw", with16, withRaw)
	e.rep.Note("fanout: %d fresh records through SetAsync from one goroutine, every Result waited on, on a schema with the change log, "+
		"while %d other connectors (each on a pool of its own) follow the log with a subscription each; ceiling = the same with 1 subscribing connector. "+
		"Every subscriber reads every entry itself (%d× the log's reads), and here the subscribers share the machine's %d CPUs with the writer and the server. "+
		"The subscribers caught up %v (16), %v (1) and %v (16 raw) after the last write, last round; pgstore wrote %.0f, %.0f and %.0f records per flush",
		e.s.records, fanoutSubscribers, fanoutSubscribers, runtime.NumCPU(), catchUp["16"].Round(time.Millisecond),
		catchUp["1"].Round(time.Millisecond), catchUp["16 raw"].Round(time.Millisecond), flushSizes["16"], flushSizes["1"], flushSizes["16 raw"])
	e.rep.Note("fanout_raw: the same writes while %d raw readers follow the log instead, each on a pgx.Conn of its own: LISTEN on the log's channel, "+
		"then SELECT … WHERE position > $1 ORDER BY position LIMIT 500 until a page comes back short. %.0f rec/s with them against %.0f with 1 subscribing connector: "+
		"a ratio of %.2f for the best raw readers, the ceiling of the fanout figure on this machine",
		fanoutSubscribers, withRaw, with1, withRaw/with1)

	return labelled(ctx, figure, "pgstore", func(ctx context.Context) error {
		return e.fanoutLatency(ctx, c, subs)
	})
}

// fanoutWrite writes the dataset into a fresh table while subs follow the
// log, and waits until each has heard every record. It returns the write's
// records per second and per flush, and how long after the last Result the
// last subscriber heard the last record.
func (e *env) fanoutWrite(ctx context.Context, c *store, n int, follow followFunc, table string, d *dataset) (rate, perFlush float64, lag time.Duration, err error) {
	// Create the table before subscribing: its CREATE_TABLE event and the
	// warm-up record are not counted.
	if err := c.Set(ctx, table+"/_warm", 0, json.RawMessage(`{"warm":true}`)); err != nil {
		return 0, 0, 0, err
	}
	var heardAll sync.WaitGroup
	var lastHeard atomic.Int64 // nanoseconds since base
	base := time.Now()
	heardAll.Add(n)
	stop, err := follow(ctx, table, int64(len(d.ids)), func() {
		at := int64(time.Since(base))
		for old := lastHeard.Load(); old < at && !lastHeard.CompareAndSwap(old, at); old = lastHeard.Load() {
		}
		heardAll.Done()
	})
	if err != nil {
		return 0, 0, 0, err
	}
	defer stop()
	rate, perFlush, err = c.setAsyncAll(ctx, d.keys(table), d.fresh, 1)
	if err != nil {
		return 0, 0, 0, err
	}
	wrote := time.Since(base)
	if err := waitGroup(ctx, &heardAll, fanoutCatchUp); err != nil {
		return 0, 0, 0, fmt.Errorf("subscribers: %w", err)
	}
	if err := e.check(ctx, e.logged, table, len(d.ids), 1); err != nil {
		return 0, 0, 0, err
	}
	return rate, perFlush, max(time.Duration(lastHeard.Load())-wrote, 0), nil
}

// A followFunc starts followers of the log that each call heard once they
// have seen want inserts into table.
type followFunc func(ctx context.Context, table string, want int64, heard func()) (stop func(), err error)

// pgstoreFollowers follows the log with a subscription on each connector.
func pgstoreFollowers(ctx context.Context, subs []*store, table string, want int64, heard func()) (func(), error) {
	var subscriptions []*pgstore.Subscription
	stop := func() {
		for _, s := range subscriptions {
			s.Close(context.Background())
		}
	}
	for _, s := range subs {
		var inserts int64
		sub, err := s.Subscribe(ctx, func(ev pgstore.Event) {
			if ev.Type != pgstore.Insert {
				return
			}
			if inserts++; inserts == want {
				heard()
			}
		}, pgstore.ForTables(table))
		if err != nil {
			stop()
			return nil, err
		}
		subscriptions = append(subscriptions, sub)
	}
	return stop, nil
}

// rawFollowers follows the log with n raw readers, each on a connection of
// its own: woken by the log's NOTIFY (or every second), it reads pages
// after its position until one comes back short.
func (e *env) rawFollowers(ctx context.Context, n int, table string, want int64, heard func()) (func(), error) {
	// The log's end: the head's position is only a floor, below what the
	// partitions hold.
	var from int64
	if err := e.raw.QueryRow(ctx, "SELECT greatest(position, (SELECT max(position) FROM "+ident(e.logged, "pgstore/log_entries")+")) FROM "+
		ident(e.logged, "pgstore/log")).Scan(&from); err != nil {
		return nil, err
	}
	sum := sha256.Sum256([]byte(e.logged))
	channel := "pgstore_log_" + hex.EncodeToString(sum[:12]) // as pgstore names it
	sql := rawPageSQL(e.logged)
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	stop := func() {
		cancel()
		wg.Wait()
	}
	for range n {
		conn, err := pgx.ConnectConfig(ctx, e.raw.Config().ConnConfig.Copy())
		if err != nil {
			stop()
			return nil, err
		}
		if _, err := conn.Exec(ctx, "LISTEN "+pgx.Identifier{channel}.Sanitize()); err != nil {
			conn.Close(ctx)
			stop()
			return nil, err
		}
		wg.Go(func() {
			defer conn.Close(context.Background())
			var entry rawEntry
			dest := entry.dest()
			pos, inserts := from, int64(0)
			for ctx.Err() == nil {
				page := 0
				rows, _ := conn.Query(ctx, sql, pos)
				for rows.Next() {
					if rows.Scan(dest...) != nil {
						break
					}
					pos, page = entry.position, page+1
					if entry.tbl == table && entry.op == "I" {
						if inserts++; inserts == want {
							heard()
						}
					}
				}
				rows.Close()
				if rows.Err() != nil {
					return // the caller's wait for heard reports it
				}
				if page == 500 {
					continue
				}
				wctx, wcancel := context.WithTimeout(ctx, time.Second)
				_, _ = conn.WaitForNotification(wctx)
				wcancel()
			}
		})
	}
	return stop, nil
}

// waitGroup waits for wg, at most timeout.
func waitGroup(ctx context.Context, wg *sync.WaitGroup, timeout time.Duration) error {
	done := make(chan struct{})
	go func() {
		wg.Wait()
		close(done)
	}()
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	select {
	case <-done:
		return nil
	case <-timer.C:
		return fmt.Errorf("not caught up within %v", timeout)
	case <-ctx.Done():
		return ctx.Err()
	}
}

// fanoutLatency updates one key with Set every fanoutInterval while subs
// follow the log, and notes the time from each Set's call to each
// subscriber's handler.
func (e *env) fanoutLatency(ctx context.Context, c *store, subs []*store) error {
	const figure, table, id = "fanout", "fanlat", "k"
	samples := e.s.fanoutSamples
	total := changeWarmup + samples
	val := benchkit.AppendValue(nil, 0, 1, e.s.valueBytes)
	if err := c.Set(ctx, table+"/"+id, 0, val); err != nil {
		return err
	}
	base := time.Now()
	sent := make([]atomic.Int64, total) // nanoseconds since base, by version-1
	heard := make([][]time.Duration, len(subs))
	var heardAll sync.WaitGroup
	var subscriptions []*pgstore.Subscription
	closeAll := func() {
		for _, s := range subscriptions {
			s.Close(context.Background()) // waits for a handler call in progress
		}
		subscriptions = nil
	}
	defer closeAll()
	for i, s := range subs {
		heard[i] = make([]time.Duration, total)
		got := heard[i]
		heardAll.Add(1)
		sub, err := s.Subscribe(ctx, func(ev pgstore.Event) {
			v := ev.Version
			if ev.ID != id || v < 1 || v > int64(total) || (ev.Type != pgstore.Update && ev.Type != pgstore.Insert) {
				return
			}
			got[v-1] = time.Since(base) - time.Duration(sent[v-1].Load())
			if v == int64(total) {
				heardAll.Done()
			}
		}, pgstore.ForTables(table))
		if err != nil {
			heardAll.Done()
			return err
		}
		subscriptions = append(subscriptions, sub)
	}
	tick := time.NewTicker(fanoutInterval)
	defer tick.Stop()
	for v := 1; v <= total; v++ {
		select {
		case <-tick.C:
		case <-ctx.Done():
			return ctx.Err()
		}
		sent[v-1].Store(int64(time.Since(base)))
		if err := c.Set(ctx, table+"/"+id, int64(v), val); err != nil {
			return err
		}
	}
	late := waitGroup(ctx, &heardAll, changeTimeout)
	if ctx.Err() != nil {
		return ctx.Err()
	}
	closeAll()

	var all []time.Duration
	lost := 0
	worst := time.Duration(0) // the largest p99 of one subscriber
	for _, got := range heard {
		var mine []time.Duration
		for _, d := range got[changeWarmup:] {
			if d == 0 {
				lost++
				continue
			}
			mine = append(mine, d)
		}
		if len(mine) > 0 {
			_, p99 := benchkit.Percentiles(mine)
			worst = max(worst, p99)
		}
		all = append(all, mine...)
	}
	if len(all) == 0 {
		return errors.New("fanout latency: no change heard")
	}
	p50, p99 := benchkit.Percentiles(all)
	progress("%s: delivery to %d subscribers p50 %v p99 %v (worst subscriber's p99 %v), %d of %d lost",
		figure, len(subs), p50, p99, worst, lost, samples*len(subs))
	e.rep.Note("fanout: delivery latency from the call of Set (write interval 0) to each of the %d subscribing connectors' handlers, "+
		"one update of one key every %v, %d samples: p50 %.1f µs, p99 %.1f µs over all %d×%d deliveries (worst subscriber's p99 %.1f µs)",
		len(subs), fanoutInterval, samples, benchkit.Micros(p50), benchkit.Micros(p99), len(subs), samples, benchkit.Micros(worst))
	if lost > 0 || late != nil {
		e.rep.Note("fanout: %d of %d deliveries not heard within %v of the last Set", lost, samples*len(subs), changeTimeout)
	}
	return nil
}

// logDiskBytes is the size on disk of the logged schema's change log: its
// partitions with their indexes and TOAST.
func (e *env) logDiskBytes(ctx context.Context) (int64, error) {
	var b int64
	err := e.raw.QueryRow(ctx, `SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint FROM pg_class c
		JOIN pg_inherits i ON i.inhrelid = c.oid WHERE i.inhparent = $1::regclass`, ident(e.logged, "pgstore/log_entries")).Scan(&b)
	return b, err
}

// rawPageSQL is the raw ceiling's read of the log: a page of every column
// after a position ($1).
func rawPageSQL(schema string) string {
	return "SELECT position, off, tbl, id, op, version, val FROM " + ident(schema, "pgstore/log_entries") +
		" WHERE position > $1 ORDER BY position LIMIT 500"
}

// A rawEntry is a row of rawPageSQL, scanned into the same variables row
// after row.
type rawEntry struct {
	position, off int64
	tbl, op       string
	id            pgtype.Text
	version       pgtype.Int8
	val           []byte
}

func (r *rawEntry) dest() []any {
	return []any{&r.position, &r.off, &r.tbl, &r.id, &r.op, &r.version, &r.val}
}
