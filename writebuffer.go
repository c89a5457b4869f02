package pgstore

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/puddle/v2"
)

// The write buffer holds accepted writes until a flush makes them durable.
//
// Writes join the newest batch; a later write to a key already in that batch
// replaces it (coalescing), so a record updated many times per interval costs
// one row write. A batch is sealed when it is flushed or full, and one
// goroutine flushes batches strictly in order, one at a time: a write can
// never overtake an earlier write to the same key. Reads look through the
// batches newest first, so they see buffered writes.

// Bookkeeping bytes charged to the buffer limit besides keys and values: a
// map entry for a new key, a Result for every accepted call.
const (
	keyOverhead    = 96
	resultOverhead = 48
)

// Result reports the outcome of a write accepted by SetAsync or DeleteAsync.
type Result struct {
	batch *batch
	err   error
	// superseded is an earlier write to the same key that this one replaced
	// in the buffer; it shares this write's outcome.
	superseded *Result
}

// Wait blocks until the write is durable, in which case it returns nil, or has
// failed, in which case it returns why. If ctx ends first Wait returns ctx's
// error, and the write goes on.
//
// A write replaced in the buffer by a later write to the same key (see
// WithWriteInterval) completes with that later write.
func (r *Result) Wait(ctx context.Context) error {
	select {
	case <-r.batch.done:
		return r.err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// settled is the batch of results that failed before joining the buffer.
var settled = func() *batch {
	b := &batch{done: make(chan struct{})}
	close(b.done)
	return b
}()

func failed(err error) *Result { return &Result{batch: settled, err: err} }

type batch struct {
	tables   map[string]*tableWrites
	count    int // distinct keys
	bytes    int // charged to the buffer limit
	created  time.Time
	inFlight bool
	done     chan struct{} // closed once every result of the batch is set
}

type tableWrites struct {
	table  *table
	writes []write        // in the order their keys first came
	index  map[string]int // id -> position in writes
	// Set by the flush: the error of the whole table, or of single ids.
	failed error
	errs   map[string]error
	cols   *columns
}

// columns are a table's writes as the array parameters of its statements.
type columns struct {
	ids      []string
	versions []int64
	values   []json.RawMessage
	deletes  []string
}

type write struct {
	id      string
	version int64
	value   []byte // nil for a delete
	res     *Result
}

type writeBuffer struct {
	mu      sync.Mutex
	batches []*batch // oldest first; only the last one accepts writes
	bytes   int
	closed  bool
	room    chan struct{} // closed (and replaced) when bytes are released
	wake    chan struct{} // tells the flusher that something changed
	starved bool          // a writer waits for room

	// With interval 0, the next batch may wait for gatherTarget writes
	// until gatherUntil (see complete).
	gatherTarget int
	gatherUntil  time.Time
}

// minAttemptTime is the least time a flush attempt is given, however little
// is left of the retry timeout.
const minAttemptTime = 5 * time.Second

// maxGather bounds how long group commit waits to gather writers.
const maxGather = time.Millisecond

// enqueue accepts a write (value nil for a delete) once the buffer has room.
func (c *Connector) enqueue(ctx context.Context, t *table, id string, version int64, value []byte) *Result {
	b := &c.buf
	cost := len(value) + resultOverhead
	b.mu.Lock()
	for !b.closed && b.bytes > 0 && b.bytes+cost+len(id)+keyOverhead > c.cfg.bufferLimit {
		room := b.room
		b.starved = true // a full buffer is flushed without waiting for the interval
		b.mu.Unlock()
		b.signal()
		select {
		case <-room:
		case <-ctx.Done():
			return failed(fmt.Errorf("pgstore: waiting for room in the write buffer: %w", ctx.Err()))
		}
		b.mu.Lock()
	}
	if b.closed {
		b.mu.Unlock()
		return failed(ErrClosed)
	}
	if c.cfg.versionGuard && value != nil {
		if newer, ok := b.lookupLocked(t.name, id); ok && newer.value != nil && newer.version > version {
			b.mu.Unlock()
			return failed(versionConflict(t.name, id, version))
		}
	}
	var cur *batch
	if n := len(b.batches); n > 0 && !b.batches[n-1].inFlight && b.batches[n-1].count < c.cfg.maxBatchSize &&
		!(c.cfg.versionGuard && value != nil && b.batches[n-1].deletes(t.name, id)) {
		cur = b.batches[n-1]
	} else {
		// A set that replaced a buffered delete would be held to the
		// version of the row the delete removes: with the guard on, it
		// goes in the next batch instead.
		cur = &batch{tables: make(map[string]*tableWrites), created: time.Now(), done: make(chan struct{})}
		b.batches = append(b.batches, cur)
	}
	tw := cur.tables[t.name]
	if tw == nil {
		tw = &tableWrites{table: t, index: make(map[string]int)}
		cur.tables[t.name] = tw
	}
	res := &Result{batch: cur}
	w := write{id: id, version: version, value: value, res: res}
	if i, ok := tw.index[id]; ok {
		res.superseded = tw.writes[i].res
		cost -= len(tw.writes[i].value)
		tw.writes[i] = w
	} else {
		tw.index[id] = len(tw.writes)
		tw.writes = append(tw.writes, w)
		cur.count++
		cost += len(id) + keyOverhead
	}
	cur.bytes += cost
	b.bytes += cost
	ready := c.cfg.writeInterval == 0 || cur.count >= c.cfg.maxBatchSize || len(b.batches) > 1
	b.mu.Unlock()
	if ready || cur.count == 1 {
		b.signal()
	}
	return res
}

// deletes reports whether the batch deletes a key.
func (bt *batch) deletes(table, id string) bool {
	w, ok := bt.tables[table].lookup(id)
	return ok && w.value == nil
}

// lookup returns the write to an id, if any.
func (tw *tableWrites) lookup(id string) (write, bool) {
	if tw == nil {
		return write{}, false
	}
	i, ok := tw.index[id]
	if !ok {
		return write{}, false
	}
	return tw.writes[i], true
}

func (b *writeBuffer) signal() {
	select {
	case b.wake <- struct{}{}:
	default:
	}
}

// lookupLocked finds the newest buffered write to a key.
func (b *writeBuffer) lookupLocked(table, id string) (write, bool) {
	for i := len(b.batches) - 1; i >= 0; i-- {
		if w, ok := b.batches[i].tables[table].lookup(id); ok {
			return w, true
		}
	}
	return write{}, false
}

func (b *writeBuffer) lookup(table, id string) (write, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.lookupLocked(table, id)
}

// nextBatch waits until the oldest batch is due and marks it in flight. It
// returns nil once the buffer is closed and empty.
func (c *Connector) nextBatch(timer *time.Timer) *batch {
	b := &c.buf
	for {
		b.mu.Lock()
		var wait time.Duration
		if len(b.batches) > 0 {
			first := b.batches[0]
			wait = c.cfg.writeInterval - time.Since(first.created)
			if c.cfg.writeInterval == 0 && first.count < b.gatherTarget {
				wait = time.Until(b.gatherUntil)
			}
			if b.closed || b.starved || wait <= 0 || len(b.batches) > 1 || first.count >= c.cfg.maxBatchSize {
				first.inFlight = true
				b.starved = false
				b.mu.Unlock()
				return first
			}
		} else if b.closed {
			b.mu.Unlock()
			return nil
		}
		b.mu.Unlock()
		if wait > 0 {
			timer.Reset(wait)
		}
		select {
		case <-b.wake:
		case <-timer.C:
		}
		timer.Stop()
	}
}

// flushLoop is the one goroutine that writes batches, oldest first.
func (c *Connector) flushLoop(ctx context.Context) {
	defer close(c.flusherDone)
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	for {
		bt := c.nextBatch(timer)
		if bt == nil {
			return
		}
		began := time.Now()
		c.flush(ctx, bt)
		c.complete(bt, time.Since(began))
	}
}

// complete removes a flushed batch from the buffer, then reports each
// write's outcome: once a write has failed, readers no longer see it, and
// once it has succeeded, they find it in the table.
func (c *Connector) complete(bt *batch, took time.Duration) {
	b := &c.buf
	b.mu.Lock()
	b.batches = b.batches[1:]
	b.bytes -= bt.bytes
	// Group commit: the writers this flush releases tend to write again at
	// once. Let the next batch wait a moment for them, so that it holds
	// what was pending plus as many again, instead of going out with the
	// pending writes alone and leaving the rest a whole flush behind.
	pending := 0
	for _, next := range b.batches {
		pending += next.count
	}
	b.gatherTarget = min(pending+bt.count, c.cfg.maxBatchSize)
	b.gatherUntil = time.Now().Add(min(took/4, maxGather))
	close(b.room)
	b.room = make(chan struct{})
	b.mu.Unlock()

	for _, tw := range bt.tables {
		for _, w := range tw.writes {
			err := tw.failed
			if err == nil && tw.errs != nil {
				err = tw.errs[w.id]
			}
			for r := w.res; r != nil; r = r.superseded {
				r.err = err
			}
		}
	}
	bt.tables = nil // results may outlive the batch; its data must not
	close(bt.done)
}

// flush writes a batch, retrying passing failures with backoff for up to the
// retry timeout. Retrying is safe even when a commit's outcome is unknown:
// upserts and deletes of the same data are idempotent, and no later write to
// the same keys is flushed meanwhile.
func (c *Connector) flush(ctx context.Context, bt *batch) {
	deadline := time.Now().Add(c.cfg.retryTimeout)
	backoff := 50 * time.Millisecond
	for attempt := 1; ; attempt++ {
		// A connection that hangs (a lost network does not always say so)
		// must not hold the batch past the retry timeout.
		attemptCtx, cancel := context.WithTimeout(ctx, max(time.Until(deadline), minAttemptTime))
		err := c.writeBatch(attemptCtx, bt)
		cancel()
		if err == nil {
			return
		}
		sleep := backoff/2 + rand.N(backoff/2+1)
		if !retryable(err) || ctx.Err() != nil || time.Now().Add(sleep).After(deadline) {
			var pgErr *pgconn.PgError
			if !errors.As(err, &pgErr) && !pgconn.SafeToRetry(err) && !errors.Is(err, puddle.ErrClosedPool) {
				// The batch was sent and no answer came back.
				err = fmt.Errorf("%w (the server may have committed it before the connection failed)", err)
			}
			err = fmt.Errorf("pgstore: write failed after %d attempt(s): %w", attempt, err)
			c.cfg.logger.Error("pgstore: batch failed", "records", bt.count, "attempts", attempt, "err", err)
			for _, tw := range bt.tables {
				if tw.failed == nil {
					tw.failed = err
				}
			}
			return
		}
		c.cfg.logger.Warn("pgstore: batch failed, retrying", "records", bt.count, "attempt", attempt, "retry_in", sleep, "err", err)
		select {
		case <-time.After(sleep):
		case <-ctx.Done():
		}
		backoff = min(backoff*2, 5*time.Second)
	}
}

// writeBatch makes one attempt at a batch. It returns an error only for a
// failure of the whole batch; what is wrong with one table or one record is
// recorded in the batch.
func (c *Connector) writeBatch(ctx context.Context, bt *batch) error {
	var tables []*tableWrites
	for _, tw := range bt.tables {
		tw.errs = nil
		if tw.failed != nil {
			continue
		}
		if !tw.table.created.Load() {
			if err := c.prepareTable(ctx, tw); err != nil {
				if retryable(err) {
					return err
				}
				tw.failed = fmt.Errorf("pgstore: table %q: %w", tw.table.name, err)
				continue
			}
			if !tw.table.created.Load() {
				continue // deletes only, from a table that does not exist: done
			}
		}
		tables = append(tables, tw)
	}
	if len(tables) == 0 {
		return nil
	}
	// Tables in name order and ids in byte order (see columns): every
	// connector locks rows in the same order, so two cannot deadlock.
	slices.SortFunc(tables, func(a, b *tableWrites) int { return strings.Compare(a.table.name, b.table.name) })

	written := make([][]string, len(tables)) // by the version guard
	var err error
	staged := c.stages(tables)
	if staged {
		err = c.writeStaged(ctx, tables, written)
		staged = !errors.Is(err, errNoStaging)
	}
	if !staged {
		// One round trip: the batch's statements run in one implicit
		// transaction, committed when the batch is closed without error.
		var pb pgx.Batch
		for i, tw := range tables {
			c.queueWrites(&pb, tw, &written[i], false)
		}
		err = c.pool.SendBatch(ctx, &pb).Close()
	}
	if err == nil {
		if c.cfg.versionGuard {
			for i, tw := range tables {
				tw.markConflicts(tw.columns().ids, written[i])
			}
		}
		return nil
	}
	if isUndefinedTable(err) {
		// Dropped behind our back: create it again on the retry.
		for _, tw := range tables {
			tw.table.created.Store(false)
		}
		return err
	}
	if retryable(err) || ctx.Err() != nil {
		return err
	}
	// Something in the batch is refused: find what, one savepoint at a time,
	// and commit the rest.
	return c.writeIsolated(ctx, tables)
}

// Large batches travel by COPY, which the server takes in faster than the
// same rows as array parameters: binary COPY into a temporary staging table,
// then one INSERT … SELECT from it per table. That costs a few round trips
// more than a pipeline of array upserts, which is why it is kept for tables
// with at least stageMinRows sets in the batch.
//
// The staging table belongs to the session: created, if missing, by the
// statement that begins the transaction, so that it exists on whichever
// server session the transaction runs (also behind a bouncer in transaction
// mode); ON COMMIT DELETE ROWS empties it at every commit, without the
// catalog churn of a TRUNCATE.
const stageMinRows = 2000

// defaultStagingRenewal bounds how long a session keeps one file for its
// staging table. Emptied in place at commit, the table keeps its
// relfrozenxid, and autovacuum cannot freeze another session's temporary
// table: it would hold back the database's datfrozenxid, and so make
// wraparound vacuums run in vain, for as long as the connection lives. A
// TRUNCATE gives it a new file, frozen as of now.
const defaultStagingRenewal = 10 * time.Minute

// stagingRenewed is the key, in a connection's CustomData, of when its
// staging table last got a new file.
const stagingRenewed = "pgstore.stagingRenewed"

var (
	stagingTable   = pgx.Identifier{"pg_temp", "pgstore_staging"}
	stagingColumns = []string{"id", "version", "val"}
	// The notice that the table exists would reach, on every flush, a pool
	// that logs notices: SET LOCAL silences it, then gives the rest of the
	// transaction the session's default back.
	beginStaging = "BEGIN; SET LOCAL client_min_messages = warning; " +
		"CREATE TEMP TABLE IF NOT EXISTS pgstore_staging (id text COLLATE \"C\", version bigint, val jsonb) ON COMMIT DELETE ROWS; " +
		"SET LOCAL client_min_messages TO DEFAULT"
	renewStaging = "; TRUNCATE " + stagingTable.Sanitize()
	clearStaging = "DELETE FROM " + stagingTable.Sanitize()
)

// errNoStaging says that the role may not create the staging table.
var errNoStaging = errors.New("pgstore: no staging table")

// stages reports whether a batch goes through the staging table.
func (c *Connector) stages(tables []*tableWrites) bool {
	if c.noStaging.Load() {
		return false
	}
	for _, tw := range tables {
		if len(tw.columns().ids) >= stageMinRows {
			return true
		}
	}
	return false
}

// writeStaged writes a batch in one explicit transaction, copying the sets
// of each large table into the staging table; tables are written in name
// order, as in a pipelined batch.
func (c *Connector) writeStaged(ctx context.Context, tables []*tableWrites, written [][]string) error {
	conn, err := c.pool.Acquire(ctx)
	if err != nil {
		return err
	}
	defer conn.Release()
	session := conn.Conn().PgConn().CustomData()
	begin := beginStaging
	renewed, _ := session[stagingRenewed].(time.Time)
	renew := time.Since(renewed) >= c.cfg.stagingRenewal
	if renew {
		begin += renewStaging
	}
	tx, err := conn.BeginTx(ctx, pgx.TxOptions{BeginQuery: begin})
	if err != nil {
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Code == "42501" {
			// No TEMPORARY privilege on the database: write as arrays.
			if !c.noStaging.Swap(true) {
				c.cfg.logger.Warn("pgstore: the role may not create temporary tables, so large batches go as array upserts, which is slower",
					"fix", "GRANT TEMPORARY ON DATABASE <database> TO <role>", "err", err)
			}
			return errNoStaging
		}
		return err
	}
	defer tx.Rollback(ctx) //nolint:errcheck // after Commit it does nothing
	var pb pgx.Batch
	staged := false // the staging table holds rows already written
	for i, tw := range tables {
		cols := tw.columns()
		stage := len(cols.ids) >= stageMinRows
		if stage {
			if staged {
				pb.Queue(clearStaging)
			}
			if pb.Len() > 0 {
				if err := tx.SendBatch(ctx, &pb).Close(); err != nil {
					return err
				}
				pb = pgx.Batch{}
			}
			rows := pgx.CopyFromSlice(len(cols.ids), func(i int) ([]any, error) {
				return []any{cols.ids[i], cols.versions[i], cols.values[i]}, nil
			})
			if _, err := tx.CopyFrom(ctx, stagingTable, stagingColumns, rows); err != nil {
				return err
			}
			staged = true
		}
		c.queueWrites(&pb, tw, &written[i], stage)
	}
	if err := tx.SendBatch(ctx, &pb).Close(); err != nil {
		return err
	}
	if err := tx.Commit(ctx); err != nil {
		return err
	}
	if renew {
		session[stagingRenewed] = time.Now()
	}
	return nil
}

// queueWrites queues a table's upsert, from array parameters or from the
// staging table, and its delete. With the version guard on, the upsert
// returns the ids it wrote into written.
func (c *Connector) queueWrites(pb *pgx.Batch, tw *tableWrites, written *[]string, staged bool) {
	cols := tw.columns()
	if len(cols.ids) > 0 {
		var q *pgx.QueuedQuery
		if staged {
			q = pb.Queue(tw.table.stagedSQL)
		} else {
			q = pb.Queue(tw.table.upsertSQL, cols.ids, cols.versions, cols.values)
		}
		if c.cfg.versionGuard {
			q.Query(func(rows pgx.Rows) error {
				var err error
				*written, err = pgx.CollectRows(rows, pgx.RowTo[string])
				return err
			})
		}
	}
	if len(cols.deletes) > 0 {
		pb.Queue(tw.table.deleteSQL, cols.deletes)
	}
}

// prepareTable creates the table of a batch that holds sets, or finds
// whether the table of a batch of deletes exists at all.
func (c *Connector) prepareTable(ctx context.Context, tw *tableWrites) error {
	for _, w := range tw.writes {
		if w.value != nil {
			if err := c.ensureTable(ctx, tw.table.name); err != nil {
				return err
			}
			tw.table.created.Store(true)
			return nil
		}
	}
	var exists bool
	err := c.pool.QueryRow(ctx, "SELECT to_regclass($1) IS NOT NULL",
		pgx.Identifier{c.cfg.schema, tw.table.name}.Sanitize()).Scan(&exists)
	if exists {
		c.foundTable(tw.table)
	}
	return err
}

// columns returns a table's writes as the array parameters of its upsert and
// delete statements.
func (tw *tableWrites) columns() *columns {
	if tw.cols != nil {
		return tw.cols
	}
	// In byte order, which is the id column's collation ("C"): the index is
	// written in order, and two connectors writing overlapping keys lock
	// rows in the same order, so they cannot deadlock. Keys often come in
	// order already; the buffer's own order must stay as it is, for reads
	// during the flush.
	writes := tw.writes
	if !slices.IsSortedFunc(writes, byID) {
		writes = slices.SortedFunc(slices.Values(writes), byID)
	}
	n := len(writes)
	cols := &columns{ids: make([]string, 0, n), versions: make([]int64, 0, n), values: make([]json.RawMessage, 0, n)}
	for _, w := range writes {
		id := w.id
		if w.value == nil {
			cols.deletes = append(cols.deletes, id)
			continue
		}
		cols.ids = append(cols.ids, id)
		cols.versions = append(cols.versions, w.version)
		cols.values = append(cols.values, w.value)
	}
	tw.cols = cols
	return cols
}

// markConflicts records a version conflict for every upserted id that the
// guard kept from being written.
func (tw *tableWrites) markConflicts(sent, written []string) {
	if len(sent) == len(written) {
		return
	}
	ok := make(map[string]bool, len(written))
	for _, id := range written {
		ok[id] = true
	}
	for _, id := range sent {
		if !ok[id] {
			w, _ := tw.lookup(id)
			tw.fail(id, versionConflict(tw.table.name, id, w.version))
		}
	}
}

func byID(a, b write) int { return strings.Compare(a.id, b.id) }

func (tw *tableWrites) fail(id string, err error) {
	if tw.errs == nil {
		tw.errs = make(map[string]error)
	}
	tw.errs[id] = err
}

// writeIsolated writes the tables of a batch that the server refused as a
// whole, in one transaction with a savepoint around each table, then around
// halves of a table whose data is refused, down to the single records at
// fault. Their neighbours are committed.
func (c *Connector) writeIsolated(ctx context.Context, tables []*tableWrites) error {
	return pgx.BeginFunc(ctx, c.pool, func(tx pgx.Tx) error {
		for _, tw := range tables {
			tw.errs = nil
			cols := tw.columns()
			err := c.applyIsolated(ctx, tx, tw, cols)
			if err == nil || retryable(err) || ctx.Err() != nil {
				if err != nil {
					return err
				}
				continue
			}
			if !isDataError(err) {
				tw.failed = fmt.Errorf("pgstore: table %q: %w", tw.table.name, err)
				continue
			}
			tw.errs = nil
			if err := c.bisect(ctx, tx, tw, cols.ids, cols.versions, cols.values, true); err != nil {
				return err
			}
			if err := c.bisect(ctx, tx, tw, cols.deletes, nil, nil, false); err != nil {
				return err
			}
		}
		return nil
	})
}

// applyIsolated runs a table's upsert and delete inside a savepoint.
func (c *Connector) applyIsolated(ctx context.Context, tx pgx.Tx, tw *tableWrites, cols *columns) error {
	return pgx.BeginFunc(ctx, tx, func(sp pgx.Tx) error {
		if len(cols.ids) > 0 {
			if err := c.upsert(ctx, sp, tw, cols.ids, cols.versions, cols.values); err != nil {
				return err
			}
		}
		if len(cols.deletes) > 0 {
			if _, err := sp.Exec(ctx, tw.table.deleteSQL, cols.deletes); err != nil {
				return err
			}
		}
		return nil
	})
}

func (c *Connector) upsert(ctx context.Context, q pgx.Tx, tw *tableWrites, ids []string, versions []int64, values []json.RawMessage) error {
	if !c.cfg.versionGuard {
		_, err := q.Exec(ctx, tw.table.upsertSQL, ids, versions, values)
		return err
	}
	rows, err := q.Query(ctx, tw.table.upsertSQL, ids, versions, values)
	if err != nil {
		return err
	}
	written, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return err
	}
	tw.markConflicts(ids, written)
	return nil
}

// bisect writes records in savepoints, halving the set on every refusal,
// and records the error of each single record the server refuses.
func (c *Connector) bisect(ctx context.Context, tx pgx.Tx, tw *tableWrites, ids []string, versions []int64, values []json.RawMessage, sets bool) error {
	if len(ids) == 0 {
		return nil
	}
	err := pgx.BeginFunc(ctx, tx, func(sp pgx.Tx) error {
		if sets {
			return c.upsert(ctx, sp, tw, ids, versions, values)
		}
		_, err := sp.Exec(ctx, tw.table.deleteSQL, ids)
		return err
	})
	if err == nil {
		return nil
	}
	if retryable(err) || ctx.Err() != nil {
		return err
	}
	if len(ids) == 1 {
		tw.fail(ids[0], fmt.Errorf("pgstore: %w %s: %w", ErrInvalidValue, quoteInput(tw.table.name+"/"+ids[0]), err))
		return nil
	}
	h := len(ids) / 2
	if sets {
		if err := c.bisect(ctx, tx, tw, ids[:h], versions[:h], values[:h], true); err != nil {
			return err
		}
		return c.bisect(ctx, tx, tw, ids[h:], versions[h:], values[h:], true)
	}
	if err := c.bisect(ctx, tx, tw, ids[:h], nil, nil, false); err != nil {
		return err
	}
	return c.bisect(ctx, tx, tw, ids[h:], nil, nil, false)
}

func versionConflict(table, id string, version int64) error {
	return fmt.Errorf("pgstore: %w: %s version %d is older than the version stored",
		ErrVersionConflict, quoteInput(table+"/"+id), version)
}

// retryable reports whether err is a passing failure of the connection or
// the server, after which the same batch may well succeed.
func retryable(err error) bool {
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return false
	}
	if errors.Is(err, puddle.ErrClosedPool) {
		return false // the caller closed its pool: no retry will help
	}
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) {
		// No answer from the server: a network or connection failure.
		return true
	}
	switch pgErr.Code {
	case "40001", "40P01", // serialization failure, deadlock
		"57P01", "57P02", "57P03", // admin or crash shutdown, cannot connect now
		"25006",          // read-only transaction: a standby, as right after a failover
		"57014", "55P03", // statement or lock timeout
		"42P01": // table dropped meanwhile, created again on the retry
		return true
	}
	class := pgErr.Code[:2]
	return class == "08" || class == "53" // connection exception, insufficient resources
}

func isUndefinedObject(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && pgErr.Code == "42704"
}

func isUndefinedTable(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && pgErr.Code == "42P01"
}

// isDataError reports whether the server refused data rather than the
// statement: invalid values (class 22), constraints (23), limits (54).
func isDataError(err error) bool {
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) {
		return false
	}
	class := pgErr.Code[:2]
	return class == "22" || class == "23" || class == "54"
}

// encodeValue turns a record value into JSON text that jsonb accepts.
func encodeValue(v any) ([]byte, error) {
	var data []byte
	switch v := v.(type) {
	case nil:
		return nil, fmt.Errorf("%w: value is nil; use Delete to remove a record", ErrInvalidValue)
	case json.RawMessage:
		data = bytes.Clone(v)
	case []byte:
		data = bytes.Clone(v)
	default:
		var err error
		if data, err = json.Marshal(v); err != nil {
			return nil, fmt.Errorf("%w: %w", ErrInvalidValue, err)
		}
		return data, checkJSONB(data, false)
	}
	return data, checkJSONB(data, true)
}

// checkJSONB reports why PostgreSQL's jsonb would refuse data: not JSON,
// invalid UTF-8, JSON null, a \u0000 escape or a lone UTF-16 surrogate.
// Marshalled data is known to be valid JSON and UTF-8.
func checkJSONB(data []byte, raw bool) error {
	if raw && !json.Valid(data) {
		if len(data) == 0 {
			return fmt.Errorf("%w: value is empty, not JSON", ErrInvalidValue)
		}
		return fmt.Errorf("%w: not valid JSON", ErrInvalidValue)
	}
	if raw && !utf8.Valid(data) {
		return fmt.Errorf("%w: JSON text is not valid UTF-8", ErrInvalidValue)
	}
	if string(bytes.TrimSpace(data)) == "null" {
		return fmt.Errorf("%w: value is JSON null; use Delete to remove a record", ErrInvalidValue)
	}
	// In valid JSON every backslash starts an escape inside a string.
	for i := bytes.IndexByte(data, '\\'); i >= 0; {
		if data[i+1] == 'u' {
			r, _ := strconv.ParseUint(string(data[i+2:i+6]), 16, 32)
			switch {
			case r == 0:
				return fmt.Errorf("%w: \\u0000 in a string, which jsonb cannot store", ErrInvalidValue)
			case r >= 0xD800 && r < 0xDC00:
				if !isLowSurrogate(data[i+6:]) {
					return fmt.Errorf("%w: \\u%04x is an unpaired UTF-16 surrogate, which jsonb refuses", ErrInvalidValue, r)
				}
				i += 6 // skip the low half as well
			case r >= 0xDC00 && r < 0xE000:
				return fmt.Errorf("%w: \\u%04x is an unpaired UTF-16 surrogate, which jsonb refuses", ErrInvalidValue, r)
			}
			i += 6
		} else {
			i += 2
		}
		next := bytes.IndexByte(data[i:], '\\')
		if next < 0 {
			break
		}
		i += next
	}
	return nil
}

func isLowSurrogate(b []byte) bool {
	if len(b) < 6 || b[0] != '\\' || b[1] != 'u' {
		return false
	}
	r, err := strconv.ParseUint(string(b[2:6]), 16, 32)
	return err == nil && r >= 0xDC00 && r < 0xE000
}
