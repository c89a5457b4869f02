// Package pgstore keeps the records of a realtime server in PostgreSQL and
// tells every server node when one changes.
//
// Records are JSON values with a version, stored under keys "table/id": the
// text before the first "/" names a table (created with its triggers on first
// write, in the connector's schema), the rest is the record's id. Writes are
// buffered, coalesced per key and flushed in batches; every write reports when
// it is durable or why it failed, and reads see buffered writes. Triggers
// append each change, with its value, to a durable log in the schema, in the
// change's transaction; Subscribe delivers it to handlers, each subscription
// reading the log from its own cursor, woken by NOTIFY through one shared
// LISTEN connection. With WithoutChangeLog, the triggers publish each change
// with NOTIFY instead, a lighter feed that loses what a lost connection
// missed and says so with a Resync.
package pgstore

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pgstore/pgstore/internal/listener"
	"github.com/pgstore/pgstore/internal/writebuf"
)

var (
	// ErrNotFound is returned by Get for a key that holds no record.
	ErrNotFound = errors.New("pgstore: record not found")
	// ErrClosed is returned by every call made after Close, and by writes
	// that Close's context ended before they were sent.
	ErrClosed = writebuf.ErrClosed
	// ErrOutcomeUnknown is wrapped by the error of a write whose commit was
	// sent, whose answer was lost, and whose outcome the server could not
	// be asked for before the write's deadline. The write may have
	// committed. Until pgstore can reach the server and end the session it
	// was sent on, which it does before it sends anything else and when
	// the connector closes, it may even still commit. Only a write that
	// was actually sent ever reports it.
	ErrOutcomeUnknown = writebuf.ErrOutcomeUnknown
	// ErrVersionConflict is matched by the error of a write refused by the
	// version guard (see WithVersionGuard), a *VersionConflictError.
	ErrVersionConflict = errors.New("pgstore: version conflict")
)

// A VersionConflictError is the error of a set that the version guard
// refused because a newer version of its record is stored or buffered.
// errors.Is(err, ErrVersionConflict) matches it.
type VersionConflictError struct {
	Key     string
	Version int64 // the set's
	// Stored is the version that kept the set out: the buffered one, or
	// the one stored when the set reached the server. It is 0 when that
	// could not be read: a write that committed while the set's statement
	// ran, seen by its conflict check but not by its snapshot.
	Stored int64
}

func (e *VersionConflictError) Error() string {
	if e.Stored == 0 {
		return fmt.Sprintf("%v: %s version %d is older than the version stored", ErrVersionConflict, quoteInput(e.Key), e.Version)
	}
	return fmt.Sprintf("%v: %s version %d is older than version %d, stored or buffered", ErrVersionConflict, quoteInput(e.Key), e.Version, e.Stored)
}

// Is makes errors.Is(err, ErrVersionConflict) match.
func (e *VersionConflictError) Is(target error) bool { return target == ErrVersionConflict }

// A Record is a stored value and its version.
type Record struct {
	Version int64
	// Value is the record's JSON. Once flushed it is the text PostgreSQL's
	// jsonb returns: white space and the order of object keys may differ
	// from what was written, so compare values as JSON, not as bytes.
	Value json.RawMessage
}

// A Connector stores records in one PostgreSQL schema. It is safe for
// concurrent use. Close it to flush buffered writes.
type Connector struct {
	pool     *pgxpool.Pool
	ownsPool bool
	cfg      config

	mu     sync.Mutex
	tables map[string]*table // tables accepted by the policy
	// existing are tables found in the database that this connector has
	// read or deleted from but not written to: their SQL and their
	// known existence are kept, bounded by the tables that exist.
	existing map[string]*table
	policyMu sync.Mutex // serialises first writes to new tables
	// policyCaller is the goroutine asking the table policy, so that a
	// policy that writes to a new table through the connector is told so
	// instead of waiting for itself on policyMu.
	policyCaller atomic.Uint64

	buf       *writebuf.Buffer
	sink      *sqlSink
	noStaging atomic.Bool // the role may not create the staging table

	listener     *listener.Listener
	listenerOnce sync.Once
	stopListener context.CancelFunc
	listenerDone chan struct{}
	subsMu       sync.RWMutex
	subs         map[string]map[*Subscription]struct{} // of the NOTIFY feed, by schema
	logSubs      map[string]map[*Subscription]struct{} // following a log, by channel

	logged atomic.Bool // the schema has a change log
	// Measured by the janitor, for Stats.
	logSize     atomic.Pointer[measured[int64]]
	queueUsage  atomic.Pointer[measured[float64]]
	stopJanitor context.CancelFunc
	janitorDone chan struct{}

	// Of the subscriptions, for Stats.
	delivered, resyncs, overflows atomic.Int64

	closing   atomic.Bool
	closeOnce sync.Once
	closeErr  error
}

// Connect opens a pool from a connection string, in URL or key=value form with
// every setting pgx knows (sslmode, pool_max_conns, ...; PG* environment
// variables fill in what it leaves out), and returns a connector that owns the
// pool. Its sessions' application_name is DefaultApplicationName unless the
// connection string or PGAPPNAME sets one. It checks that the server answers and prepares the schema before it
// returns; there is no retry loop: ctx bounds the wait.
func Connect(ctx context.Context, connString string, opts ...Option) (*Connector, error) {
	cfg, err := newConfig(opts)
	if err != nil {
		return nil, err
	}
	poolCfg, err := parseConnString(connString)
	if err != nil {
		return nil, err
	}
	if poolCfg.ConnConfig.RuntimeParams["application_name"] == "" {
		// So that operators can tell pgstore's sessions apart in
		// pg_stat_activity; a connection string (or PGAPPNAME) may say
		// otherwise.
		poolCfg.ConnConfig.RuntimeParams["application_name"] = DefaultApplicationName
	}
	pool, err := pgxpool.NewWithConfig(ctx, poolCfg)
	if err != nil {
		return nil, fmt.Errorf("pgstore: %w", err)
	}
	c, err := start(ctx, pool, cfg)
	if err != nil {
		pool.Close()
		return nil, err
	}
	c.ownsPool = true
	return c, nil
}

// New returns a connector on the caller's pool, which Close leaves open. Like
// Connect, it checks the server and prepares the schema before it returns.
func New(ctx context.Context, pool *pgxpool.Pool, opts ...Option) (*Connector, error) {
	if pool == nil {
		return nil, errors.New("pgstore: New: pool is nil")
	}
	cfg, err := newConfig(opts)
	if err != nil {
		return nil, err
	}
	return start(ctx, pool, cfg)
}

func newConfig(opts []Option) (config, error) {
	cfg := defaultConfig()
	for i, opt := range opts {
		if opt == nil {
			return config{}, fmt.Errorf("pgstore: option %d of %d is nil", i+1, len(opts))
		}
		if err := opt(&cfg); err != nil {
			return config{}, fmt.Errorf("pgstore: %w", err)
		}
	}
	return cfg, nil
}

func start(ctx context.Context, pool *pgxpool.Pool, cfg config) (*Connector, error) {
	if err := pool.Ping(ctx); err != nil {
		return nil, fmt.Errorf("pgstore: connect: %w", err)
	}
	var chosen *eventSet
	if cfg.eventsChosen {
		chosen = &cfg.events
	}
	state, events, err := prepareSchema(ctx, pool, cfg.schema, cfg.changeLog, chosen, cfg.events)
	if err != nil {
		return nil, fmt.Errorf("pgstore: prepare schema %q: %w%s", cfg.schema, err, privilegeFixes(ctx, pool, cfg, err))
	}
	if cfg.changeLog.off && state != logNone {
		return nil, fmt.Errorf("pgstore: schema %q: %w", cfg.schema, errLogOn)
	}
	cfg.events = events // the schema's, as WithEvents last recorded them
	// A connector that chose nothing follows the schema, and with a log
	// on, finishes a switch that stopped before every NOTIFY trigger went.
	if (cfg.eventsChosen || cfg.changeLog.retention > 0 || state == logOn) && state != logStarting {
		if err := syncTriggers(ctx, pool, cfg.schema, cfg.events, !cfg.eventsChosen, state); err != nil {
			return nil, fmt.Errorf("pgstore: update the triggers of schema %q to WithEvents and WithChangeLog: %w", cfg.schema, err)
		}
	}
	if state, err = switchLogOn(ctx, pool, cfg.schema, state, cfg.events, !cfg.eventsChosen); err != nil {
		return nil, fmt.Errorf("pgstore: switch the change log of schema %q on: %w", cfg.schema, err)
	}
	logged := state != logNone
	c := &Connector{
		pool:     pool,
		cfg:      cfg,
		tables:   make(map[string]*table),
		existing: make(map[string]*table),
	}
	c.listener = &listener.Listener{
		Connect: func(ctx context.Context) (*pgx.Conn, error) {
			conn, err := c.listeningConn(ctx)
			if err != nil {
				return nil, err
			}
			// A listening connection is idle between notifications: a
			// server's idle_session_timeout must not end it (and force a
			// Resync) while the server is well. Servers before 14 lack
			// the setting.
			_, err = conn.Exec(ctx, "SET idle_session_timeout = 0")
			if err != nil && !isUndefinedObject(err) {
				conn.Close(ctx)
				return nil, err
			}
			return conn, nil
		},
		Notify:      c.dispatch,
		Reconnected: c.resyncAll,
		Logger:      cfg.logger,
	}
	c.subs = make(map[string]map[*Subscription]struct{})
	c.logSubs = make(map[string]map[*Subscription]struct{})
	c.logged.Store(logged) // the triggers of some tables take the head lock
	janitorCtx, stopJanitor := context.WithCancel(context.Background())
	c.stopJanitor = stopJanitor
	c.janitorDone = make(chan struct{})
	go c.janitorLoop(janitorCtx, janitorInterval(cfg.changeLog.retention))
	c.listenerDone = make(chan struct{})
	c.sink = &sqlSink{c: c}
	c.buf = writebuf.New(writebuf.Config{
		Interval:     cfg.writeInterval,
		MaxBatch:     cfg.maxBatchSize,
		Limit:        cfg.bufferLimit,
		RetryTimeout: cfg.retryTimeout,
		MinAttempt:   cfg.minAttempt,
		Guard:        cfg.versionGuard,
		Conflict:     versionConflict,
		Logger:       cfg.logger,
		Observe:      observeFlushes(cfg.tracer, cfg.schema),
	}, c.sink)
	return c, nil
}

// prepareAgain makes the connector's schema again, as Connect made it, after
// it was dropped behind the connector's back (or by DestroySchema).
func (c *Connector) prepareAgain(ctx context.Context) error {
	state, events, err := prepareSchema(ctx, c.pool, c.cfg.schema, c.cfg.changeLog, nil, c.cfg.events)
	if err == nil {
		state, err = switchLogOn(ctx, c.pool, c.cfg.schema, state, events, !c.cfg.eventsChosen)
	}
	if err != nil {
		return err
	}
	c.logged.Store(state != logNone)
	return nil
}

// Close flushes every accepted write, ends the subscriptions, waits for the
// background work to end and closes the pool if the connector opened it. If
// ctx ends first, the writes still buffered fail, and Close returns ctx's
// error without waiting further for handlers still running. Calls made after Close
// return ErrClosed; Close itself may be called again and returns the same.
func (c *Connector) Close(ctx context.Context) error {
	c.closeOnce.Do(func() {
		c.closing.Store(true)
		if err := c.buf.Close(ctx); err != nil {
			c.closeErr = fmt.Errorf("pgstore: close: writes not yet sent failed: %w", err)
		}
		// The flusher has ended: the sink is Close's now.
		if err := c.sink.fenceOnClose(); err != nil {
			c.cfg.logger.Error("pgstore: close: a batch whose outcome is unknown could not be ended, and may still commit", "err", err)
			if c.closeErr == nil {
				c.closeErr = fmt.Errorf("pgstore: close: a batch whose outcome is unknown could not be ended, and may still commit: %w", err)
			}
		}
		if err := c.sink.deleteSpentOnClose(ctx); err != nil {
			c.cfg.logger.Warn("pgstore: close: cannot delete the commit markers of settled batches; markers a day old are swept", "err", err)
		}
		if err := c.closeFeed(ctx); err != nil && c.closeErr == nil {
			c.closeErr = err
		}
		if c.ownsPool {
			// pgxpool waits for every connection to come back: one held by
			// Rows never closed, or a query still running, must not hold
			// Close past ctx.
			closed := make(chan struct{})
			go func() {
				defer close(closed)
				c.pool.Close()
			}()
			select {
			case <-closed:
			case <-ctx.Done():
				if c.closeErr == nil {
					c.closeErr = fmt.Errorf("pgstore: close: connections still in use (Rows not closed, or a query running); the pool closes when they are returned: %w", ctx.Err())
				}
			}
		}
	})
	return c.closeErr
}

// Set writes a record and returns once it is durable, or why it is not. value
// is any value encoding/json can marshal, or a json.RawMessage or []byte that
// holds JSON. If ctx ends first, Set returns ctx's error and the write, once
// accepted, still goes ahead.
func (c *Connector) Set(ctx context.Context, key string, version int64, value any) error {
	return waitDurable(ctx, key, c.set(ctx, key, version, value))
}

// waitDurable waits for an accepted write, and tells a caller whose ctx ends
// first that the write goes on, unlike one that was never accepted.
func waitDurable(ctx context.Context, key string, r *Result) error {
	err := r.Wait(ctx)
	if err != nil && r.r.Accepted() && ctx.Err() != nil && errors.Is(err, ctx.Err()) {
		return fmt.Errorf("pgstore: %s accepted but not yet durable (it will still be written): %w", quoteInput(key), err)
	}
	return err
}

// SetAsync accepts a write without waiting for it to be durable, and returns
// its Result. Writes are applied in the order of the calls. It waits only when
// the write buffer is full (see WithBufferLimit), and ctx bounds only that
// wait: once accepted, the write goes on whatever becomes of ctx. Errors about
// the key or the value, and a ctx that ended before there was room, are
// reported by the Result at once.
func (c *Connector) SetAsync(ctx context.Context, key string, version int64, value any) *Result {
	return c.set(ctx, key, version, value)
}

func (c *Connector) set(ctx context.Context, key string, version int64, value any) *Result {
	if c.closing.Load() {
		return failed(ErrClosed)
	}
	t, id, err := c.writeTable(key)
	if err != nil {
		return failed(err)
	}
	if c.cfg.versionGuard && version < 0 {
		return failed(fmt.Errorf("pgstore: %s: version %d is negative; the version guard needs versions of 0 or more", quoteInput(key), version))
	}
	data, err := encodeValue(value, c.cfg.maxValueBytes)
	if err != nil {
		return failed(fmt.Errorf("%w (key %s)", err, quoteInput(key)))
	}
	return &Result{c.buf.Enqueue(ctx, writebuf.Op{Table: t.name, Handle: t, ID: id, Version: version, Value: data})}
}

// Delete removes a record and returns once the removal is durable. Deleting
// a key that holds no record succeeds. If ctx ends first, Delete returns
// ctx's error and the removal still goes ahead.
func (c *Connector) Delete(ctx context.Context, key string) error {
	return waitDurable(ctx, key, c.delete(ctx, key))
}

// DeleteAsync accepts a removal without waiting for it to be durable, in call
// order with the other writes. Like SetAsync, it waits only for room in the
// buffer, and ctx bounds only that wait.
func (c *Connector) DeleteAsync(ctx context.Context, key string) *Result {
	return c.delete(ctx, key)
}

func (c *Connector) delete(ctx context.Context, key string) *Result {
	if c.closing.Load() {
		return failed(ErrClosed)
	}
	name, id, err := splitKey(key, c.cfg.defaultTable)
	if err != nil {
		return failed(err)
	}
	t, _ := c.knownTable(name)
	return &Result{c.buf.Enqueue(ctx, writebuf.Op{Table: t.name, Handle: t, ID: id})}
}

// Get returns the record under key, including a write that is still buffered,
// or ErrNotFound. With the version guard on, a buffered set older than the
// stored record (which its flush will refuse) is not returned: the stored
// record is.
func (c *Connector) Get(ctx context.Context, key string) (Record, error) {
	if c.closing.Load() {
		return Record{}, ErrClosed
	}
	name, id, err := splitKey(key, c.cfg.defaultTable)
	if err != nil {
		return Record{}, err
	}
	version, value, buffered := c.buf.Lookup(name, id)
	if buffered && value == nil {
		return Record{}, ErrNotFound
	}
	// The buffer's copy must stay as it is.
	pending := Record{Version: version, Value: append([]byte(nil), value...)}
	if buffered && (!c.cfg.versionGuard || c.buf.DeleteBefore(name, id)) {
		return pending, nil
	}
	var rec Record
	t, known := c.knownTable(name)
	err = c.pool.QueryRow(ctx, t.getSQL, id).Scan(&rec.Version, &rec.Value)
	if buffered && (err == nil && rec.Version <= pending.Version || errors.Is(err, pgx.ErrNoRows) || isUndefinedTable(err)) {
		return pending, nil
	}
	if !known && (err == nil || errors.Is(err, pgx.ErrNoRows)) {
		c.foundTable(t)
	}
	if errors.Is(err, pgx.ErrNoRows) || isUndefinedTable(err) {
		return Record{}, ErrNotFound
	}
	if err != nil {
		return Record{}, fmt.Errorf("pgstore: get %s: %w", quoteInput(key), err)
	}
	return rec, nil
}

// writeTable splits a key for a write, asking the table policy the first time
// a table is written.
func (c *Connector) writeTable(key string) (*table, string, error) {
	name, id, err := splitKey(key, c.cfg.defaultTable)
	if err != nil {
		return nil, "", err
	}
	c.mu.Lock()
	t := c.tables[name]
	c.mu.Unlock()
	if t != nil {
		return t, id, nil
	}
	// One decision at a time, so that writers racing to a new table ask the
	// policy once: a policy may count tables against a quota.
	if c.cfg.tablePolicy != nil && c.policyCaller.Load() == goid() {
		return nil, "", fmt.Errorf("pgstore: table %s: the table policy may not write to a table the connector has not written to yet; it would wait for its own decision", quoteInput(name))
	}
	c.policyMu.Lock()
	defer c.policyMu.Unlock()
	c.mu.Lock()
	t = c.tables[name]
	c.mu.Unlock()
	if t != nil {
		return t, id, nil
	}
	if c.cfg.tablePolicy != nil {
		c.policyCaller.Store(goid())
		err := c.cfg.tablePolicy(name)
		c.policyCaller.Store(0)
		if err != nil {
			return nil, "", fmt.Errorf("pgstore: table %s refused by the table policy: %w", quoteInput(name), err)
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	t = c.existing[name]
	if t == nil {
		t = newTable(c.cfg.schema, name, c.cfg.versionGuard)
	}
	delete(c.existing, name)
	c.tables[name] = t
	return t, id, nil
}

// knownTable returns the remembered table of that name, or a fresh one that
// is not remembered (known false): reads and deletes of arbitrary names must
// not grow the connector's memory until the table is found to exist.
func (c *Connector) knownTable(name string) (t *table, known bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if t := c.tables[name]; t != nil {
		return t, true
	}
	if t := c.existing[name]; t != nil {
		return t, true
	}
	return newTable(c.cfg.schema, name, c.cfg.versionGuard), false
}

// foundTable remembers a table that knownTable made, once it is found to
// exist.
func (c *Connector) foundTable(t *table) {
	t.created.Store(true)
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.tables[t.name] == nil && c.existing[t.name] == nil {
		c.existing[t.name] = t
	}
}

// Schema returns the name of the connector's schema, as given to WithSchema.
func (c *Connector) Schema() string { return c.cfg.schema }

// Query runs sql on the connector's pool, for what the rest of the API does
// not cover. Close the rows.
func (c *Connector) Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error) {
	if c.closing.Load() {
		return nil, ErrClosed
	}
	return c.pool.Query(ctx, sql, args...)
}

// Exec runs a statement on the connector's pool.
func (c *Connector) Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error) {
	if c.closing.Load() {
		return pgconn.CommandTag{}, ErrClosed
	}
	return c.pool.Exec(ctx, sql, args...)
}

// closeFeed ends every subscription and the LISTEN connection. It waits for
// handlers still running until ctx ends.
func (c *Connector) closeFeed(ctx context.Context) error {
	c.subsMu.Lock()
	var subs []*Subscription
	for _, set := range c.subs {
		for s := range set {
			subs = append(subs, s)
		}
	}
	for _, set := range c.logSubs {
		for s := range set {
			subs = append(subs, s)
		}
	}
	c.subs = nil // no more subscriptions
	c.subsMu.Unlock()
	for _, s := range subs {
		s.stop(false)
	}
	c.stopJanitor()
	<-c.janitorDone
	c.listenerOnce.Do(func() { close(c.listenerDone) }) // never started
	if c.stopListener != nil {
		c.stopListener()
	}
	<-c.listenerDone
	for _, s := range subs {
		if err := s.wait(ctx); err != nil {
			return fmt.Errorf("pgstore: close: a subscription handler is still running: %w", err)
		}
	}
	return nil
}
