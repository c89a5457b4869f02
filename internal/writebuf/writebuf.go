// Package writebuf holds accepted writes until a Sink makes them durable.
//
// It owns the rules of pgstore's write path that need no database: writes
// are ordered per key and coalesce (a later write to a key replaces the
// buffered one, which then shares its outcome); reads see buffered writes;
// memory is bounded and a full buffer makes writers wait; one goroutine
// flushes batches strictly in order, one at a time, so a write never
// overtakes an earlier write to the same key; every write's deadline counts
// from its acceptance; a batch whose commit reply was lost is resolved
// before anything else goes out; a batch that is too large is halved.
//
// The Sink does the I/O and classifies what went wrong; the Buffer decides
// what happens next.
package writebuf

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/pgstore/pgstore/internal/backoff"
)

// Errors the buffer gives writes. The root package exports them.
var (
	// ErrClosed: the buffer was closed before the write was accepted, or
	// Close's context ended before the write was sent.
	ErrClosed = errors.New("pgstore: connector closed")
	// ErrOutcomeUnknown: the write was sent with its commit, no answer
	// came, and the server could not be asked before the deadline whether
	// it committed. It may or may not have; the sink must end the attempt
	// before it writes anything else.
	ErrOutcomeUnknown = errors.New("pgstore: outcome unknown")
)

// A Failure says what an attempt's error means for the batch.
type Failure int

const (
	// Permanent: the same batch would fail again; its writes fail.
	Permanent Failure = iota
	// Transient: nothing committed, and the same batch may pass later.
	Transient
	// TooLarge: the server gave up on the batch's size (a statement
	// timeout); nothing committed, and halves may pass.
	TooLarge
	// Unknown: the commit was sent and its answer lost. The sink must be
	// asked, with Resolve, before the batch is written again or given up.
	Unknown
)

// A Sink writes batches. The Buffer calls it from one goroutine at a time.
type Sink interface {
	// Write makes one attempt at a batch, in one transaction. It sets the
	// Err of a write that the server refused on its own, its neighbours
	// being committed, and returns nil; or it returns why the whole batch
	// did not commit, and what that means.
	Write(ctx context.Context, b *Batch) (Failure, error)
	// Resolve finds out whether the last attempt at b, whose answer was
	// lost, committed, once that attempt can no longer commit. When it did,
	// Resolve sets each write's Err as Write would have. An error means the
	// server could not be asked; Resolve is called again.
	Resolve(ctx context.Context, b *Batch) (committed bool, err error)
}

// A Batch is what one flush writes: tables in name order, each with its
// writes, one per key.
type Batch struct {
	Tables []*Table
	count  int
}

// Len is the number of writes in the batch.
func (b *Batch) Len() int { return b.count }

// A Table is the writes of a batch to one table.
type Table struct {
	Name   string
	Handle any // from the first Op of the table in the batch
	Writes []*Write
	// Meta is the sink's own, to keep what it derives from Writes between
	// calls on the same batch.
	Meta any
}

// A Write is the newest buffered write to one key. The sink may set Err,
// and must change nothing else.
type Write struct {
	ID      string
	Version int64
	Value   []byte // nil for a delete
	Err     error
	res     *Result
}

// An Op is a write to enqueue.
type Op struct {
	Table   string
	Handle  any
	ID      string
	Version int64
	Value   []byte // nil for a delete
}

// Config sets a Buffer's rules.
type Config struct {
	// Interval is how long a write may wait for others to coalesce with.
	// With 0, a batch goes out as soon as no flush is in flight (group
	// commit).
	Interval time.Duration
	// MaxBatch bounds the writes of one batch.
	MaxBatch int
	// Limit bounds, in bytes, what accepted writes hold.
	Limit int
	// RetryTimeout bounds how long after a batch is due its writes may
	// still be retried (or their outcome sought).
	RetryTimeout time.Duration
	// MinAttempt is the least time an attempt is given, however little of
	// the deadline is left; otherwise an attempt may take half of what is
	// left.
	MinAttempt time.Duration
	// Guard is the version guard: a set older than the buffered set of its
	// key is refused at once, and a set never joins a batch that deletes
	// its key.
	Guard bool
	// Conflict makes the error of a set the guard refuses.
	Conflict func(table, id string, version, newer int64) error
	// Logger receives retries and failures.
	Logger *slog.Logger
	// Observe, if set, is called as each batch's flush starts, with the
	// flush's context and its writes; the context it returns is the one
	// the sink gets, and done is called once every write has its outcome.
	Observe func(ctx context.Context, writes int) (_ context.Context, done func(durable, failed int, err error))
}

// Bookkeeping bytes charged to the limit besides keys and values: a map
// entry for a new key, a Result for every accepted call.
const (
	KeyOverhead    = 96
	ResultOverhead = 48
)

// maxGather bounds how long group commit waits to gather writers.
const maxGather = time.Millisecond

// Waits between attempts at one batch.
const (
	minRetryWait = 50 * time.Millisecond
	maxRetryWait = 5 * time.Second
)

// A Result is the outcome of one accepted (or refused) write.
type Result struct {
	done <-chan struct{}
	err  error
	// superseded is an earlier write to the same key that this one
	// replaced in the buffer; it shares this write's outcome.
	superseded *Result
}

var closedChan = func() chan struct{} { c := make(chan struct{}); close(c); return c }()

// Failed returns the Result of a write refused before it was accepted.
func Failed(err error) *Result { return &Result{done: closedChan, err: err} }

// Wait blocks until the write is durable (nil) or has failed, or ctx ends.
func (r *Result) Wait(ctx context.Context) error {
	select {
	case <-r.done:
		return r.err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Accepted reports whether the write joined the buffer.
func (r *Result) Accepted() bool { return r.done != closedChan }

type batch struct {
	tables   map[string]*table
	count    int // distinct keys
	bytes    int
	due      time.Time // when its oldest write is due: accepted + Interval
	inFlight bool
	done     chan struct{}
}

type table struct {
	name   string
	handle any
	writes []*Write
	index  map[string]int
}

// A Buffer holds writes until its Sink has written them.
type Buffer struct {
	cfg  Config
	sink Sink

	mu      sync.Mutex
	batches []*batch // oldest first; only the last may take writes
	bytes   int
	closed  bool
	room    chan struct{} // closed and replaced when bytes are released
	wake    chan struct{}
	starved bool // a writer waits for room
	// Group commit: the next batch may wait for gatherTarget writes until
	// gatherUntil.
	gatherTarget int
	gatherUntil  time.Time

	// failing is why the last batch failed for a passing reason, until a
	// batch succeeds: batches whose deadline has passed meanwhile fail with
	// it instead of each waiting out an attempt.
	failing   error
	failingAt time.Time

	stats   Stats        // guarded by mu, but for Writes, Bytes and Retries
	retries atomic.Int64 // counted by the flusher as it goes

	cancel context.CancelFunc
	done   chan struct{}
}

// Stats are a Buffer's counters since New, and what it holds now. A write
// that a later one to its key replaced in the buffer shares that one's
// outcome, and is not counted apart.
type Stats struct {
	Writes, Bytes int   // buffered now: accepted, outcome not yet known
	Flushes       int64 // batches flushed, whatever the outcome
	FlushTime     time.Duration
	LastFlushTime time.Duration
	Durable       int64 // writes made durable
	Retries       int64 // attempts at a batch after its first
	// Writes failed, by cause: refused by the server or the version guard
	// (at Enqueue too), given up when the retry timeout passed, outcome
	// unknown, or failed by Close (a write that came after is not
	// counted: it was never accepted).
	Refused, TimedOut, Unknown, Closed int64
}

// Stats returns the buffer's counters.
func (b *Buffer) Stats() Stats {
	b.mu.Lock()
	defer b.mu.Unlock()
	st := b.stats
	for _, bt := range b.batches {
		st.Writes += bt.count
	}
	st.Bytes = b.bytes
	st.Retries = b.retries.Load()
	return st
}

// notSent is the error of a write not sent because the retry timeout passed
// while the batches before it failed with cause.
type notSent struct{ cause error }

func (e notSent) Error() string {
	return "pgstore: write not sent: the retry timeout passed while earlier writes failed: " + strings.TrimPrefix(e.cause.Error(), "pgstore: ")
}

func (e notSent) Unwrap() error { return e.cause }

// retryTimeout marks the errors of writes given up because their retry
// timeout passed, for Stats.
type retryTimeout struct{ error }

func (e retryTimeout) Unwrap() error { return e.error }

// countFailureLocked counts a failed write by its cause.
func (b *Buffer) countFailureLocked(err error) {
	switch {
	case errors.Is(err, ErrClosed):
		b.stats.Closed++
	case errors.Is(err, ErrOutcomeUnknown):
		b.stats.Unknown++
	case errors.As(err, new(retryTimeout)):
		b.stats.TimedOut++
	default:
		b.stats.Refused++
	}
}

// New starts a Buffer's flusher.
func New(cfg Config, sink Sink) *Buffer {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.MaxBatch < 1 {
		cfg.MaxBatch = 1
	}
	ctx, cancel := context.WithCancel(context.Background())
	b := &Buffer{
		cfg:    cfg,
		sink:   sink,
		room:   make(chan struct{}),
		wake:   make(chan struct{}, 1),
		cancel: cancel,
		done:   make(chan struct{}),
	}
	go b.loop(ctx)
	return b
}

// Enqueue accepts a write once the buffer has room; ctx bounds only that
// wait. What it returns reports the outcome, or why it was not accepted.
func (b *Buffer) Enqueue(ctx context.Context, op Op) *Result {
	cost := len(op.Value) + ResultOverhead
	set := op.Value != nil
	b.mu.Lock()
	for !b.closed && b.bytes > 0 && b.bytes+cost+len(op.ID)+KeyOverhead > b.cfg.Limit {
		if err := b.guardLocked(op); err != nil {
			b.stats.Refused++
			b.mu.Unlock()
			return Failed(err) // at once, not after waiting for room
		}
		room := b.room
		b.starved = true // a full buffer is flushed without waiting for the interval
		b.mu.Unlock()
		b.signal()
		select {
		case <-room:
		case <-ctx.Done():
			return Failed(fmt.Errorf("pgstore: waiting for room in the write buffer: %w", ctx.Err()))
		}
		b.mu.Lock()
	}
	if b.closed {
		b.mu.Unlock()
		return Failed(ErrClosed)
	}
	if err := b.guardLocked(op); err != nil {
		b.stats.Refused++
		b.mu.Unlock()
		return Failed(err)
	}
	var cur *batch
	if n := len(b.batches); n > 0 && !b.batches[n-1].inFlight && b.batches[n-1].count < b.cfg.MaxBatch &&
		!(b.cfg.Guard && set && b.batches[n-1].deletes(op.Table, op.ID)) {
		cur = b.batches[n-1]
	} else {
		// A set that replaced a buffered delete would be held to the
		// version of the row the delete removes: with the guard on, it
		// goes in the next batch instead.
		cur = &batch{tables: make(map[string]*table), due: time.Now().Add(b.cfg.Interval), done: make(chan struct{})}
		b.batches = append(b.batches, cur)
	}
	t := cur.tables[op.Table]
	if t == nil {
		t = &table{name: op.Table, handle: op.Handle, index: make(map[string]int)}
		cur.tables[op.Table] = t
	}
	res := &Result{done: cur.done}
	w := &Write{ID: op.ID, Version: op.Version, Value: op.Value, res: res}
	if i, ok := t.index[op.ID]; ok {
		res.superseded = t.writes[i].res
		cost -= len(t.writes[i].Value)
		t.writes[i] = w
	} else {
		t.index[op.ID] = len(t.writes)
		t.writes = append(t.writes, w)
		cur.count++
		cost += len(op.ID) + KeyOverhead
	}
	cur.bytes += cost
	b.bytes += cost
	ready := b.cfg.Interval == 0 || cur.count >= b.cfg.MaxBatch || len(b.batches) > 1
	b.mu.Unlock()
	if ready || cur.count == 1 {
		b.signal()
	}
	return res
}

// guardLocked refuses, with the version guard on, a set older than the
// buffered set of its key.
func (b *Buffer) guardLocked(op Op) error {
	if !b.cfg.Guard || op.Value == nil {
		return nil
	}
	if newer, ok := b.lookupLocked(op.Table, op.ID); ok && newer.Value != nil && newer.Version > op.Version {
		return b.cfg.Conflict(op.Table, op.ID, op.Version, newer.Version)
	}
	return nil
}

func (bt *batch) deletes(tbl, id string) bool {
	w, ok := bt.tables[tbl].lookup(id)
	return ok && w.Value == nil
}

func (t *table) lookup(id string) (*Write, bool) {
	if t == nil {
		return nil, false
	}
	i, ok := t.index[id]
	if !ok {
		return nil, false
	}
	return t.writes[i], true
}

// Lookup returns the newest buffered write to a key: its Value is nil for a
// delete, and must not be modified.
func (b *Buffer) Lookup(tbl, id string) (version int64, value []byte, ok bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	w, ok := b.lookupLocked(tbl, id)
	if !ok {
		return 0, nil, false
	}
	return w.Version, w.Value, true
}

// DeleteBefore reports whether a buffered delete of the key comes before
// its newest buffered write: the version guard then does not hold that
// write to the stored version.
func (b *Buffer) DeleteBefore(tbl, id string) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	newest := true
	for i := len(b.batches) - 1; i >= 0; i-- {
		if w, ok := b.batches[i].tables[tbl].lookup(id); ok {
			if !newest && w.Value == nil {
				return true
			}
			newest = false
		}
	}
	return false
}

func (b *Buffer) lookupLocked(tbl, id string) (*Write, bool) {
	for i := len(b.batches) - 1; i >= 0; i-- {
		if w, ok := b.batches[i].tables[tbl].lookup(id); ok {
			return w, true
		}
	}
	return nil, false
}

func (b *Buffer) signal() {
	select {
	case b.wake <- struct{}{}:
	default:
	}
}

// Close stops accepting writes and flushes what is buffered. If ctx ends
// first, the attempt in flight is cancelled, writes not yet sent fail with
// ErrClosed, and Close returns ctx's error once every write has its
// outcome.
func (b *Buffer) Close(ctx context.Context) error {
	if ctx.Err() != nil {
		b.cancel() // before the flusher wakes: nothing more is sent
	}
	b.mu.Lock()
	if !b.closed {
		b.closed = true
		close(b.room) // writers waiting for room give up
		b.room = make(chan struct{})
	}
	b.mu.Unlock()
	b.signal()
	select {
	case <-b.done:
		b.cancel()
		return nil
	case <-ctx.Done():
		b.cancel()
		<-b.done
		return ctx.Err()
	}
}

// next waits until the oldest batch is due and marks it in flight. It
// returns nil once the buffer is closed and empty.
func (b *Buffer) next(timer *time.Timer) *batch {
	for {
		b.mu.Lock()
		var wait time.Duration
		if len(b.batches) > 0 {
			first := b.batches[0]
			wait = time.Until(first.due)
			if b.cfg.Interval == 0 && first.count < b.gatherTarget {
				wait = time.Until(b.gatherUntil)
			}
			if b.closed || b.starved || wait <= 0 || len(b.batches) > 1 || first.count >= b.cfg.MaxBatch {
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

func (b *Buffer) loop(ctx context.Context) {
	defer close(b.done)
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	for {
		bt := b.next(timer)
		if bt == nil {
			return
		}
		began := time.Now()
		view := bt.view()
		fctx, done := ctx, func(int, int, error) {}
		if b.cfg.Observe != nil {
			fctx, done = b.cfg.Observe(ctx, view.count)
		}
		if ctx.Err() != nil {
			failAll(view, fmt.Errorf("%w: close's context ended before the write was sent", ErrClosed))
		} else {
			b.flush(fctx, view, bt.due, bt.due.Add(b.cfg.RetryTimeout))
		}
		b.complete(bt, time.Since(began), done)
	}
}

// view is the batch as the sink sees it: tables in name order.
func (bt *batch) view() *Batch {
	v := &Batch{count: bt.count}
	for _, t := range bt.tables {
		v.Tables = append(v.Tables, &Table{Name: t.name, Handle: t.handle, Writes: t.writes})
	}
	slices.SortFunc(v.Tables, func(a, b *Table) int { return cmp.Compare(a.Name, b.Name) })
	return v
}

func (v *Batch) each(f func(*Write)) {
	for _, t := range v.Tables {
		for _, w := range t.Writes {
			f(w)
		}
	}
}

func failAll(v *Batch, err error) { v.each(func(w *Write) { w.Err = err }) }

// halves splits a batch into two of about half its writes each.
func (v *Batch) halves() [2]*Batch {
	first, second := &Batch{}, &Batch{}
	n := 0
	for _, t := range v.Tables {
		for _, w := range t.Writes {
			into := first
			if n >= v.count/2 {
				into = second
			}
			if k := len(into.Tables); k == 0 || into.Tables[k-1].Name != t.Name {
				into.Tables = append(into.Tables, &Table{Name: t.Name, Handle: t.Handle})
			}
			last := into.Tables[len(into.Tables)-1]
			last.Writes = append(last.Writes, w)
			into.count++
			n++
		}
	}
	return [2]*Batch{first, second}
}

// flush writes a batch, retrying what can pass until the deadline.
func (b *Buffer) flush(ctx context.Context, v *Batch, due, deadline time.Time) {
	wait := backoff.Backoff{Min: minRetryWait, Max: maxRetryWait}
	for attempt := 1; ; attempt++ {
		if attempt == 1 && b.failing != nil && due.Before(b.failingAt) && time.Until(deadline) < b.cfg.MinAttempt {
			// The batch was due while an earlier one was failing for a
			// passing reason, and what is left of its deadline is less
			// than an attempt may take: it fails with the cause, instead
			// of each queued batch spending an attempt of its own.
			failAll(v, retryTimeout{notSent{b.failing}})
			return
		}
		if attempt > 1 {
			b.retries.Add(1)
		}
		v.each(func(w *Write) { w.Err = nil })
		actx, cancel := context.WithTimeout(ctx, b.attemptBound(deadline))
		kind, err := b.sink.Write(actx, v)
		cancel()
		if err == nil {
			b.failing = nil
			return
		}
		if ctx.Err() != nil && kind != Unknown {
			failAll(v, fmt.Errorf("%w: close's context ended before the write was committed: %w", ErrClosed, err))
			return
		}
		switch kind {
		case Permanent:
			b.cfg.Logger.Error("pgstore: batch failed", "records", v.count, "err", err)
			failAll(v, err)
			return
		case TooLarge:
			if v.count > 1 {
				b.cfg.Logger.Warn("pgstore: batch too large for the server, halving it", "records", v.count, "err", err)
				for _, half := range v.halves() {
					switch {
					case ctx.Err() != nil:
						failAll(half, fmt.Errorf("%w: close's context ended before the write was sent", ErrClosed))
					case !time.Now().Before(deadline):
						failAll(half, retryTimeout{fmt.Errorf("pgstore: write failed: the retry timeout passed while halving a batch the server gave up on: %w", err)})
					default:
						b.flush(ctx, half, due, deadline)
					}
				}
				return
			}
		case Unknown:
			committed, rerr := b.resolve(ctx, v, deadline)
			if rerr != nil {
				err = fmt.Errorf("%w: the commit was sent, its answer lost (%w), and the server could not be asked whether it committed: %w", ErrOutcomeUnknown, err, rerr)
				b.cfg.Logger.Error("pgstore: batch outcome unknown", "records", v.count, "err", err)
				b.failing, b.failingAt = rerr, time.Now()
				failAll(v, err)
				return
			}
			if committed {
				b.failing = nil
				return
			}
			// It did not commit, and can no longer: write it again.
		}
		sleep := wait.Next()
		if time.Now().Add(sleep).After(deadline) {
			err = retryTimeout{fmt.Errorf("pgstore: write failed after %d attempt(s): %w", attempt, err)}
			b.cfg.Logger.Error("pgstore: batch failed", "records", v.count, "attempts", attempt, "err", err)
			b.failing, b.failingAt = err, time.Now()
			failAll(v, err)
			return
		}
		b.cfg.Logger.Warn("pgstore: batch failed, retrying", "records", v.count, "attempt", attempt, "retry_in", sleep, "err", err)
		if !backoff.Sleep(ctx, sleep) {
			failAll(v, fmt.Errorf("%w: close's context ended before the write was committed: %w", ErrClosed, err))
			return
		}
	}
}

// attemptBound is how long an attempt may take: half of what is left
// before the deadline, so that a connection that hangs silently leaves
// time to learn the attempt's outcome and to try again; at least
// MinAttempt.
func (b *Buffer) attemptBound(deadline time.Time) time.Duration {
	return max(time.Until(deadline)/2, b.cfg.MinAttempt)
}

// resolve asks the sink whether a batch whose answer was lost committed,
// until it can tell or the deadline passes.
func (b *Buffer) resolve(ctx context.Context, v *Batch, deadline time.Time) (bool, error) {
	wait := backoff.Backoff{Min: minRetryWait, Max: maxRetryWait}
	for {
		rctx, cancel := context.WithTimeout(ctx, b.attemptBound(deadline))
		committed, err := b.sink.Resolve(rctx, v)
		cancel()
		if err == nil {
			return committed, nil
		}
		sleep := wait.Next()
		if ctx.Err() != nil || time.Now().Add(sleep).After(deadline) {
			return false, err
		}
		b.cfg.Logger.Warn("pgstore: cannot yet learn whether a batch committed, retrying", "retry_in", sleep, "err", err)
		if !backoff.Sleep(ctx, sleep) {
			return false, err
		}
	}
}

// complete removes a flushed batch from the buffer, then reports each
// write's outcome: once a write has failed, readers no longer see it, and
// once it has succeeded, they find it in the table.
//
// It tells observed the writes' outcomes before anyone else learns them.
func (b *Buffer) complete(bt *batch, took time.Duration, observed func(durable, failed int, err error)) {
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
	b.gatherTarget = min(pending+bt.count, b.cfg.MaxBatch)
	b.gatherUntil = time.Now().Add(min(took/4, maxGather))
	b.stats.Flushes++
	b.stats.FlushTime += took
	b.stats.LastFlushTime = took
	var durable, failed int
	var firstErr error
	for _, t := range bt.tables {
		for _, w := range t.writes {
			if w.Err == nil {
				durable++
				continue
			}
			if failed++; firstErr == nil {
				firstErr = w.Err
			}
			b.countFailureLocked(w.Err)
		}
	}
	b.stats.Durable += int64(durable)
	close(b.room)
	b.room = make(chan struct{})
	b.mu.Unlock()
	observed(durable, failed, firstErr)

	for _, t := range bt.tables {
		for _, w := range t.writes {
			for r := w.res; r != nil; r = r.superseded {
				r.err = w.Err
			}
		}
	}
	bt.tables = nil // results may outlive the batch; its data must not
	close(bt.done)
}
