package pgstore

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/puddle/v2"

	"github.com/pgstore/pgstore/internal/writebuf"
)

// The rules of the write buffer (order, coalescing, backpressure, deadlines,
// what to do with a failed batch) live in internal/writebuf, which needs no
// database. This file is its Sink: how one batch is written, in one
// transaction, and how a failure is classified.
//
// Every attempt writes a marker, a random token, into the schema's
// "pgstore/commits" table in the same transaction as the records. When the
// answer to an attempt is lost, Resolve (outcome.go) ends the attempt's
// backend and claims the token itself: if the token is already there, the
// attempt committed; if the claim succeeds, the attempt did not, and can
// no longer (its own insert of the token would fail).

// Result reports the outcome of a write accepted by SetAsync or DeleteAsync.
type Result struct{ r *writebuf.Result }

// Wait blocks until the write is durable, in which case it returns nil, or
// has failed, in which case it returns why. If ctx ends first Wait returns
// ctx's error, and the write goes on.
//
// A write replaced in the buffer by a later write to the same key (see
// WithWriteInterval) completes with that later write.
func (r *Result) Wait(ctx context.Context) error { return r.r.Wait(ctx) }

func failed(err error) *Result { return &Result{writebuf.Failed(err)} }

// minAttemptTime is the least time a flush attempt is given, however little
// is left of the retry timeout.
const minAttemptTime = 5 * time.Second

// tableBatch is what the sink derives from a batch's writes to one table.
type tableBatch struct {
	t       *table
	sets    []*writebuf.Write // in id order
	deletes []*writebuf.Write // in id order
	refused map[string]int64  // ids the version guard kept out, from the last attempt, with the version stored
}

func (s *sqlSink) tableBatch(wt *writebuf.Table) *tableBatch {
	if tb, ok := wt.Meta.(*tableBatch); ok {
		return tb
	}
	// In byte order, which is the id column's collation ("C"): the index is
	// written in order, and connectors writing overlapping keys lock rows
	// in the same order, so they cannot deadlock. Keys often come in order
	// already; the buffer's own order must stay as it is, for reads during
	// the flush.
	writes := wt.Writes
	if !slices.IsSortedFunc(writes, byID) {
		writes = slices.SortedFunc(slices.Values(writes), byID)
	}
	tb := &tableBatch{t: wt.Handle.(*table)}
	for _, w := range writes {
		if w.Value == nil {
			tb.deletes = append(tb.deletes, w)
		} else {
			tb.sets = append(tb.sets, w)
		}
	}
	wt.Meta = tb
	return tb
}

func byID(a, b *writebuf.Write) int { return strings.Compare(a.ID, b.ID) }

// setColumns returns sets as the array parameters of an upsert.
func setColumns(sets []*writebuf.Write) ([]string, []int64, []json.RawMessage) {
	ids := make([]string, len(sets))
	versions := make([]int64, len(sets))
	values := make([]json.RawMessage, len(sets))
	for i, w := range sets {
		ids[i], versions[i], values[i] = w.ID, w.Version, w.Value
	}
	return ids, versions, values
}

func writeIDs(ws []*writebuf.Write) []string {
	ids := make([]string, len(ws))
	for i, w := range ws {
		ids[i] = w.ID
	}
	return ids
}

// Write makes one attempt at a batch.
func (s *sqlSink) Write(ctx context.Context, b *writebuf.Batch) (writebuf.Failure, error) {
	c := s.c
	if err := s.fenceAbandoned(ctx, b); err != nil {
		return classifyUnsent(err), fmt.Errorf("pgstore: ending an earlier batch whose outcome is unknown: %w", err)
	}
	var tables []*tableBatch
	for _, wt := range b.Tables {
		tb := s.tableBatch(wt)
		tb.refused = nil
		if !tb.t.created.Load() {
			if err := c.prepareTable(ctx, tb); err != nil {
				if kind := classifyUnsent(err); kind != writebuf.Permanent {
					return kind, err
				}
				failWrites(wt.Writes, fmt.Errorf("pgstore: table %q: %w", tb.t.name, err))
				continue
			}
			if !tb.t.created.Load() {
				continue // deletes only, from a table that does not exist: done
			}
		}
		tables = append(tables, tb)
	}
	if len(tables) == 0 {
		return 0, nil
	}
	token := newToken()
	var (
		sent bool    // the commit may have reached the server
		be   backend // the server process the attempt ran on, if known
		err  error
	)
	staged := s.stages(tables)
	if staged {
		sent, be, err = s.writeStaged(ctx, tables, token)
		staged = !errors.Is(err, errNoStaging)
	}
	if !staged {
		sent, be, err = s.writePipelined(ctx, tables, token)
	}
	if err == nil {
		s.committed(token)
		s.markRefused(tables)
		s.c.logWritten()
		return 0, nil
	}
	if isUndefinedTable(err) {
		// Dropped behind our back: create it again on the retry, and
		// pgstore's own tables with it.
		for _, tb := range tables {
			tb.t.created.Store(false)
		}
		if perr := s.c.prepareAgain(ctx); perr != nil {
			err = fmt.Errorf("%w; and preparing the schema again: %w", err, perr)
		}
		return writebuf.Transient, err
	}
	var pgErr *pgconn.PgError
	if kind := classify(ctx, err); kind != writebuf.Permanent || ctx.Err() != nil || !errors.As(err, &pgErr) {
		return s.lostOrNot(b, token, be, sent, kind, err)
	}
	// The server refused something in the batch: find what, one savepoint
	// at a time, and commit the rest.
	return s.writeIsolated(ctx, b, tables, token)
}

// lostOrNot turns an attempt whose connection failed into Unknown when its
// commit was sent, so that it is resolved; and when it was not, still has
// its backend ended before the next attempt, since that backend may hold
// the transaction's locks until it notices.
func (s *sqlSink) lostOrNot(b *writebuf.Batch, token string, be backend, sent bool, kind writebuf.Failure, err error) (writebuf.Failure, error) {
	if sent && kind == writebuf.Transient && endsSession(err) {
		// The server ended the session, perhaps after the commit was
		// durable (a terminate or shutdown during a synchronous
		// replication wait reports the commit as done locally): ask.
		kind = writebuf.Unknown
	}
	if kind != writebuf.Unknown {
		return kind, err
	}
	a := lostAttempt{batch: b, token: token, backend: be}
	if sent {
		s.lost = &a
		return writebuf.Unknown, err
	}
	if be.pid != 0 {
		s.abandoned = append(s.abandoned, a)
	}
	return writebuf.Transient, err
}

// writePipelined writes a batch in one round trip: its statements run in
// one implicit transaction, committed at its end.
func (s *sqlSink) writePipelined(ctx context.Context, tables []*tableBatch, token string) (sent bool, be backend, err error) {
	conn, be, err := s.acquire(ctx)
	if err != nil {
		return false, be, err
	}
	defer conn.Release()
	var pb pgx.Batch
	s.queueMarker(&pb, token, true)
	for _, tb := range tables {
		s.queueWrites(&pb, tb, token, false)
	}
	err = conn.SendBatch(ctx, &pb).Close()
	// Statements are prepared, in a round trip of their own, before any
	// is run: an error there sent nothing that could commit.
	return !errors.As(err, new(pgx.ErrPreprocessingBatch)), be, err
}

func failWrites(ws []*writebuf.Write, err error) {
	for _, w := range ws {
		w.Err = err
	}
}

// acquire takes a connection from the pool and learns, once per connection,
// which server backend it talks to, so that an attempt whose answer is lost
// can be ended.
func (s *sqlSink) acquire(ctx context.Context) (*pgxpool.Conn, backend, error) {
	conn, err := s.c.pool.Acquire(ctx)
	if err != nil {
		return nil, backend{}, err
	}
	data := conn.Conn().PgConn().CustomData()
	if be, ok := data[backendKey].(backend); ok {
		return conn, be, nil
	}
	var be backend
	err = conn.QueryRow(ctx, "SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()").Scan(&be.pid, &be.start)
	if err != nil && !errors.Is(err, pgx.ErrNoRows) {
		conn.Release()
		return nil, backend{}, err
	}
	if err != nil || uint32(be.pid) != conn.Conn().PgConn().PID() {
		// Behind a pooler, the server backend may serve other clients
		// next: not ours to end. The marker alone then fences, as it
		// does where the server does not show the session.
		be = backend{}
	}
	data[backendKey] = be
	return conn, be, nil
}

// queueWrites queues a table's statements: with both sets and deletes, a
// lock of all its rows in id order first, so that connectors that set what
// others delete lock in one order; then the upsert, from array parameters
// or from the staging table, and the delete.
func (s *sqlSink) queueWrites(pb *pgx.Batch, tb *tableBatch, token string, staged bool) {
	if len(tb.sets) > 0 && len(tb.deletes) > 0 {
		all := writeIDs(tb.sets)
		all = append(all, writeIDs(tb.deletes)...)
		slices.Sort(all)
		pb.Queue(tb.t.lockSQL, all)
	}
	if len(tb.sets) > 0 {
		var q *pgx.QueuedQuery
		switch {
		case staged && s.c.cfg.versionGuard:
			q = pb.Queue(tb.t.stagedSQL, token, tb.t.name)
		case staged:
			q = pb.Queue(tb.t.stagedSQL)
		case s.c.cfg.versionGuard:
			ids, versions, values := setColumns(tb.sets)
			q = pb.Queue(tb.t.upsertSQL, ids, versions, values, token, tb.t.name)
		default:
			ids, versions, values := setColumns(tb.sets)
			q = pb.Queue(tb.t.upsertSQL, ids, versions, values)
		}
		if s.c.cfg.versionGuard {
			q.Query(func(rows pgx.Rows) error {
				var err error
				tb.refused, err = collectRefused(rows)
				return err
			})
		}
	}
	if len(tb.deletes) > 0 {
		pb.Queue(tb.t.deleteSQL, writeIDs(tb.deletes))
	}
}

// markRefused gives the sets that the version guard kept out their error.
func (s *sqlSink) markRefused(tables []*tableBatch) {
	for _, tb := range tables {
		tb.markRefused(tb.refused)
	}
}

func (tb *tableBatch) markRefused(refused map[string]int64) {
	if len(refused) == 0 {
		return
	}
	for _, w := range tb.sets {
		if stored, ok := refused[w.ID]; ok {
			if stored <= w.Version {
				// Read in the statement's snapshot, older than the row
				// its conflict check saw: a write committed meanwhile.
				stored = 0
			}
			w.Err = versionConflict(tb.t.name, w.ID, w.Version, stored)
		}
	}
}

// collectRefused reads the ids the guarded upsert refused, each with the
// version it found stored.
func collectRefused(rows pgx.Rows) (map[string]int64, error) {
	refused := make(map[string]int64)
	var id string
	var stored int64
	_, err := pgx.ForEachRow(rows, []any{&id, &stored}, func() error {
		refused[id] = stored
		return nil
	})
	return refused, err
}

// prepareTable creates the table of a batch that holds sets, or finds
// whether the table of a batch of deletes exists at all.
func (c *Connector) prepareTable(ctx context.Context, tb *tableBatch) error {
	if len(tb.sets) > 0 {
		if err := c.ensureTable(ctx, tb.t.name); err != nil {
			return err
		}
		tb.t.created.Store(true)
		return nil
	}
	var exists bool
	err := c.pool.QueryRow(ctx, "SELECT to_regclass($1) IS NOT NULL",
		pgx.Identifier{c.cfg.schema, tb.t.name}.Sanitize()).Scan(&exists)
	if exists {
		c.foundTable(tb.t)
	}
	return err
}

// writeIsolated writes the tables of a batch that the server refused as a
// whole, in one transaction with a savepoint around each table, then around
// halves of a table whose data is refused, down to the single records at
// fault. Their neighbours are committed.
func (s *sqlSink) writeIsolated(ctx context.Context, b *writebuf.Batch, tables []*tableBatch, token string) (writebuf.Failure, error) {
	conn, be, err := s.acquire(ctx)
	if err != nil {
		return classifyUnsent(err), err
	}
	defer conn.Release()
	var commitSent bool
	err = func() error {
		tx, err := conn.Begin(ctx)
		if err != nil {
			return err
		}
		defer tx.Rollback(ctx) //nolint:errcheck // after Commit it does nothing
		var pb pgx.Batch
		s.queueMarker(&pb, token, true)
		if err := tx.SendBatch(ctx, &pb).Close(); err != nil {
			return err
		}
		for _, tb := range tables {
			failWrites(tb.sets, nil)
			failWrites(tb.deletes, nil)
			err := s.applyIsolated(ctx, tx, tb, token)
			if err == nil {
				continue
			}
			if classify(ctx, err) != writebuf.Permanent || ctx.Err() != nil {
				return err
			}
			if !isDataError(err) {
				err = fmt.Errorf("pgstore: table %q: %w", tb.t.name, err)
				failWrites(tb.sets, err)
				failWrites(tb.deletes, err)
				continue
			}
			// What the rolled-back savepoint marked is void.
			failWrites(tb.sets, nil)
			failWrites(tb.deletes, nil)
			if err := s.bisect(ctx, tx, tb, tb.sets, true, token); err != nil {
				return err
			}
			if err := s.bisect(ctx, tx, tb, tb.deletes, false, token); err != nil {
				return err
			}
		}
		commitSent = true
		return tx.Commit(ctx)
	}()
	if err == nil {
		s.committed(token)
		s.c.logWritten()
		return 0, nil
	}
	return s.lostOrNot(b, token, be, commitSent, classify(ctx, err), err)
}

// applyIsolated runs a table's statements inside a savepoint.
func (s *sqlSink) applyIsolated(ctx context.Context, tx pgx.Tx, tb *tableBatch, token string) error {
	return pgx.BeginFunc(ctx, tx, func(sp pgx.Tx) error {
		if len(tb.sets) > 0 && len(tb.deletes) > 0 {
			all := append(writeIDs(tb.sets), writeIDs(tb.deletes)...)
			slices.Sort(all)
			if _, err := sp.Exec(ctx, tb.t.lockSQL, all); err != nil {
				return err
			}
		}
		if err := s.apply(ctx, sp, tb, tb.sets, true, token); err != nil {
			return err
		}
		return s.apply(ctx, sp, tb, tb.deletes, false, token)
	})
}

// apply runs the upsert of sets, or the delete of deletes, and records what
// the version guard refused.
func (s *sqlSink) apply(ctx context.Context, q pgx.Tx, tb *tableBatch, ws []*writebuf.Write, sets bool, token string) error {
	if len(ws) == 0 {
		return nil
	}
	if !sets {
		_, err := q.Exec(ctx, tb.t.deleteSQL, writeIDs(ws))
		return err
	}
	ids, versions, values := setColumns(ws)
	if !s.c.cfg.versionGuard {
		_, err := q.Exec(ctx, tb.t.upsertSQL, ids, versions, values)
		return err
	}
	// The refused ids are recorded under the token only by the batch's
	// own statement; here they are all in one transaction, so the marker
	// and the refused rows commit together.
	rows, err := q.Query(ctx, tb.t.upsertSQL, ids, versions, values, token, tb.t.name)
	if err != nil {
		return err
	}
	refused, err := collectRefused(rows)
	if err != nil {
		return err
	}
	tb.markRefused(refused)
	return nil
}

// bisect writes records in savepoints, halving them on every refusal, and
// records the error of each single record the server refuses.
func (s *sqlSink) bisect(ctx context.Context, tx pgx.Tx, tb *tableBatch, ws []*writebuf.Write, sets bool, token string) error {
	if len(ws) == 0 {
		return nil
	}
	err := pgx.BeginFunc(ctx, tx, func(sp pgx.Tx) error { return s.apply(ctx, sp, tb, ws, sets, token) })
	if err == nil {
		return nil
	}
	if classify(ctx, err) != writebuf.Permanent || ctx.Err() != nil || !isDataError(err) {
		return err
	}
	if len(ws) == 1 {
		ws[0].Err = fmt.Errorf("%w %s: %w", ErrInvalidValue, quoteInput(tb.t.name+"/"+ws[0].ID), err)
		return nil
	}
	h := len(ws) / 2
	if err := s.bisect(ctx, tx, tb, ws[:h], sets, token); err != nil {
		return err
	}
	return s.bisect(ctx, tx, tb, ws[h:], sets, token)
}

func versionConflict(table, id string, version, stored int64) error {
	return &VersionConflictError{Key: table + "/" + id, Version: version, Stored: stored}
}

// classify says what an attempt's error means for its batch.
func classify(ctx context.Context, err error) writebuf.Failure {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		if pgErr.Code == "57014" && ctx.Err() == nil {
			return writebuf.TooLarge // statement timeout: the server gave up on its size
		}
		if retryableCode(pgErr.Code) {
			return writebuf.Transient
		}
		return writebuf.Permanent
	}
	if errors.Is(err, puddle.ErrClosedPool) {
		return writebuf.Permanent // the caller closed its pool: no retry will help
	}
	var connectErr *pgconn.ConnectError
	if pgconn.SafeToRetry(err) || errors.As(err, &connectErr) {
		return writebuf.Transient // nothing was sent
	}
	var netErr net.Error
	if errors.As(err, &netErr) || errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		pgconn.Timeout(err) || errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		return writebuf.Unknown // sent, and the connection failed before the answer
	}
	// The driver refused to send it (encoding, misuse): it would again.
	return writebuf.Permanent
}

// classifyUnsent classifies the error of a step that sent none of the
// batch's writes (taking a connection, creating a table, fencing): short of
// a server's refusal or a closed pool, it is a passing failure.
func classifyUnsent(err error) writebuf.Failure {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) || errors.Is(err, puddle.ErrClosedPool) {
		return classify(context.Background(), err)
	}
	return writebuf.Transient
}

// retryableCode reports whether a server error is a passing failure, after
// which the same batch may well succeed. None of them leaves the
// transaction committed.
func retryableCode(code string) bool {
	switch code {
	case "40001", "40P01", // serialization failure, deadlock
		"57P01", "57P02", "57P03", // admin or crash shutdown, cannot connect now
		"57P05", "25P03", // idle-session and idle-in-transaction timeouts end the session
		"25006",          // read-only transaction: a standby, as right after a failover
		"57014", "55P03", // statement (or cancelled) and lock timeout
		"42P01": // table dropped meanwhile, created again on the retry
		return true
	}
	class := code[:2]
	return class == "08" || class == "53" // connection exception, insufficient resources
}

// endsSession reports whether the server ended the session with err.
func endsSession(err error) bool {
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) {
		return false
	}
	return pgErr.Severity == "FATAL" || pgErr.Severity == "PANIC" || strings.HasPrefix(pgErr.Code, "57P") || strings.HasPrefix(pgErr.Code, "08")
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
