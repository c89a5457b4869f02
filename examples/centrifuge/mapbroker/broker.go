package mapbroker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/centrifugal/centrifuge"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pgstore/pgstore"
)

var (
	// ErrInvalidChannel wraps every error about a channel name that cannot
	// be a pgstore table.
	ErrInvalidChannel = errors.New("mapbroker: invalid channel")
	// ErrInvalidKey wraps every error about a key that cannot be a pgstore
	// record id.
	ErrInvalidKey = errors.New("mapbroker: invalid key")
	// ErrInvalidValue wraps every error about tags, client info or other
	// text that PostgreSQL cannot store exactly as given.
	ErrInvalidValue = errors.New("mapbroker: invalid value")
	// ErrUnsupported wraps every error about a channel option or a call
	// that this broker cannot honour on pgstore.
	ErrUnsupported = errors.New("mapbroker: not supported")
	// ErrOutcomeUnknown is wrapped by the error of a change whose COMMIT
	// was sent and whose answer was lost: it may have been applied. Retry
	// it with an IdempotencyKey to apply it at most once. The caller's
	// context does not cut that answer short (a change cancelled then could
	// commit after its error); a lost connection, or no answer within 30
	// seconds, does.
	ErrOutcomeUnknown = errors.New("mapbroker: outcome unknown")
)

// Config configures a Broker.
type Config struct {
	// Store is the pgstore connector whose schema holds the channels. Its
	// schema must have the change log on, as pgstore's default is (see
	// pgstore.WithChangeLog). Required.
	Store *pgstore.Connector
	// Pool runs the broker's transactions. It must reach the database of
	// Store (the pool given to pgstore.New, or another on the same
	// database) and allow at least 2 connections when it is Store's own
	// pool: creating a channel's table holds one while pgstore writes on
	// another. Required.
	Pool *pgxpool.Pool
	// IdempotentResultTTL is how long the result of a change made with an
	// IdempotencyKey is kept when the change does not set its own
	// IdempotentResultTTL. Defaults to 5 minutes, as centrifuge's brokers.
	IdempotentResultTTL time.Duration
	// ExpireInterval is how often the broker removes the keys whose KeyTTL
	// passed and the channels whose MetaTTL passed. Defaults to 1 second.
	ExpireInterval time.Duration
	// Logger receives what the broker cannot return to a caller: failed
	// deliveries and background work. Defaults to slog.Default().
	Logger *slog.Logger
}

// Defaults of the Config fields, as documented on each.
const (
	DefaultIdempotentResultTTL = 5 * time.Minute
	DefaultExpireInterval      = time.Second
)

// A Broker is a centrifuge.MapBroker on a pgstore connector. It is safe for
// concurrent use; Close it to stop its background work.
type Broker struct {
	node   *centrifuge.Node
	store  *pgstore.Connector
	pool   *pgxpool.Pool
	sql    *sqlSet
	cfg    Config
	logger *slog.Logger

	mu      sync.Mutex
	handler centrifuge.BrokerEventHandler
	sub     *pgstore.Subscription
	subs    map[string]struct{} // channels this node delivers
	known   map[string]bool     // channels whose table was last seen to exist

	// ensureMu lets one channel's table be made or dropped at a time: each
	// holds a connection while pgstore takes another.
	ensureMu sync.Mutex

	queues changeQueues // changes waiting for a group (see group.go)

	stop      context.CancelFunc
	bgCtx     context.Context
	janitor   chan struct{}
	closeOnce sync.Once
}

var _ centrifuge.MapBroker = (*Broker)(nil)

// New returns a broker on cfg.Store's schema, for node's map channels (their
// options come from node's Config.Map.GetMapChannelOptions). It checks that
// the schema has its change log and that cfg.Pool reaches it, creates the
// broker's tables if missing, and starts the expiry of keys and channels.
func New(node *centrifuge.Node, cfg Config) (*Broker, error) {
	switch {
	case node == nil:
		return nil, errors.New("mapbroker: New: node is nil")
	case cfg.Store == nil:
		return nil, errors.New("mapbroker: Config.Store is nil")
	case cfg.Pool == nil:
		return nil, errors.New("mapbroker: Config.Pool is nil")
	case cfg.IdempotentResultTTL < 0:
		return nil, fmt.Errorf("mapbroker: Config.IdempotentResultTTL must not be negative, got %v", cfg.IdempotentResultTTL)
	case cfg.ExpireInterval < 0:
		return nil, fmt.Errorf("mapbroker: Config.ExpireInterval must not be negative, got %v", cfg.ExpireInterval)
	}
	if cfg.IdempotentResultTTL == 0 {
		cfg.IdempotentResultTTL = DefaultIdempotentResultTTL
	}
	if cfg.ExpireInterval == 0 {
		cfg.ExpireInterval = DefaultExpireInterval
	}
	logger := cfg.Logger
	if logger == nil {
		logger = slog.Default()
	}
	b := &Broker{
		node:    node,
		store:   cfg.Store,
		pool:    cfg.Pool,
		sql:     newSQL(cfg.Store.Schema()),
		cfg:     cfg,
		logger:  logger,
		subs:    make(map[string]struct{}),
		known:   make(map[string]bool),
		queues:  changeQueues{channels: make(map[string]*changeQueue)},
		janitor: make(chan struct{}),
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := b.checkLog(ctx); err != nil {
		return nil, err
	}
	if err := pgx.BeginFunc(ctx, b.pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, b.sql.lockExclusive, lockClass, b.sql.schema); err != nil {
			return err
		}
		for _, stmt := range b.sql.createTables {
			if _, err := tx.Exec(ctx, stmt); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		return nil, fmt.Errorf("mapbroker: create the broker's tables in schema %q: %w", b.sql.schema, err)
	}
	b.bgCtx, b.stop = context.WithCancel(context.Background())
	go b.runJanitor()
	return b, nil
}

// checkLog checks that the schema's change log is on, and that the store
// and the pool see the same log.
func (b *Broker) checkLog(ctx context.Context) error {
	schema, readLog := b.sql.schema, b.sql.readLog
	var viaPool string
	var active bool
	err := b.pool.QueryRow(ctx, readLog).Scan(&viaPool, &active)
	if isUndefinedTable(err) || err == nil && !active {
		return fmt.Errorf("%w: schema %q has no change log (the store has pgstore.WithoutChangeLog, or the schema recorded it); open a connector with pgstore.WithChangeLog to turn it on", ErrUnsupported, schema)
	}
	if err != nil {
		return fmt.Errorf("mapbroker: read the change log of schema %q: %w", schema, err)
	}
	rows, err := b.store.Query(ctx, readLog)
	if err != nil {
		return fmt.Errorf("mapbroker: read the change log of schema %q through the store: %w", schema, err)
	}
	viaStore, err := pgx.CollectExactlyOneRow(rows, func(row pgx.CollectableRow) (string, error) {
		var id string
		var on bool
		err := row.Scan(&id, &on)
		return id, err
	})
	if err != nil {
		return fmt.Errorf("mapbroker: read the change log of schema %q through the store: %w", schema, err)
	}
	if viaStore != viaPool {
		return errors.New("mapbroker: Config.Pool and Config.Store reach different change logs: give a pool on the store's database")
	}
	return nil
}

// Close stops the delivery of publications and the expiry of keys. It
// leaves the store and the pool open. It may be called more than once.
func (b *Broker) Close(ctx context.Context) error {
	var err error
	b.closeOnce.Do(func() {
		b.stop()
		b.mu.Lock()
		sub := b.sub
		b.sub = nil
		b.mu.Unlock()
		if sub != nil {
			err = sub.Close(ctx)
		}
	})
	if err != nil {
		return fmt.Errorf("mapbroker: close: %w", err)
	}
	select {
	case <-b.janitor:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("mapbroker: close: background work still running: %w", ctx.Err())
	}
}

// RegisterEventHandler starts the delivery of the publications of the
// channels this node subscribes to, this node's own included, to h: one
// subscription to the schema's change log, from its end as of this call,
// whose events are delivered in the log's order.
func (b *Broker) RegisterEventHandler(h centrifuge.BrokerEventHandler) error {
	if h == nil {
		return errors.New("mapbroker: RegisterEventHandler: handler is nil")
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.bgCtx.Err() != nil {
		return fmt.Errorf("mapbroker: RegisterEventHandler: %w", pgstore.ErrClosed)
	}
	b.handler = h
	if b.sub != nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(b.bgCtx, 30*time.Second)
	defer cancel()
	sub, err := b.store.Subscribe(ctx, b.deliver, pgstore.ForEvents(pgstore.Insert, pgstore.Update, pgstore.Delete))
	if err != nil {
		return fmt.Errorf("mapbroker: follow the change log: %w", err)
	}
	b.sub = sub
	return nil
}

// Subscribe makes this node deliver the publications of channels to the
// event handler, from the next one the log's follower reads.
func (b *Broker) Subscribe(channels ...string) error {
	for _, ch := range channels {
		if err := checkChannel(ch); err != nil {
			return err
		}
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, ch := range channels {
		b.subs[ch] = struct{}{}
	}
	return nil
}

// Unsubscribe stops the delivery of the publications of channels.
func (b *Broker) Unsubscribe(channels ...string) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, ch := range channels {
		delete(b.subs, ch)
	}
	return nil
}

// Stats returns the number of keys of a channel: its table's rows.
func (b *Broker) Stats(ctx context.Context, ch string) (centrifuge.MapStats, error) {
	if err := checkChannel(ch); err != nil {
		return centrifuge.MapStats{}, err
	}
	var n int64
	err := b.pool.QueryRow(ctx, b.sql.count(ch)).Scan(&n)
	if isUndefinedTable(err) {
		return centrifuge.MapStats{}, nil
	}
	if err != nil {
		return centrifuge.MapStats{}, fmt.Errorf("mapbroker: stats of channel %q: %w", ch, err)
	}
	return centrifuge.MapStats{NumKeys: int(n)}, nil
}

// channelOptions resolves a channel's options, and refuses what pgstore
// cannot honour.
func (b *Broker) channelOptions(ch string) (centrifuge.MapChannelOptions, error) {
	if err := checkChannel(ch); err != nil {
		return centrifuge.MapChannelOptions{}, err
	}
	opts, err := centrifuge.ResolveAndValidateMapChannelOptions(b.node.Config().Map.GetMapChannelOptions, ch)
	if err != nil {
		return opts, fmt.Errorf("mapbroker: channel %q: %w", ch, err)
	}
	if opts.Mode.IsEphemeral() {
		return opts, fmt.Errorf("%w: channel %q: MapModeEphemeral: pgstore's change log records every change, so a channel always has a stream; use MapModeRecoverable (with KeyTTL) or MapModePersistent", ErrUnsupported, ch)
	}
	return opts, nil
}

// sentinelID is the id of the record the broker writes and deletes through
// pgstore to have it create a channel's table; no key may take it.
const sentinelID = "\u2400pgstore-centrifuge:create-table"

// checkChannel reports why a channel cannot be a pgstore table of its own.
func checkChannel(ch string) error {
	switch {
	case ch == "":
		return fmt.Errorf("%w: the name is empty", ErrInvalidChannel)
	case !utf8.ValidString(ch):
		return fmt.Errorf("%w %q: not valid UTF-8", ErrInvalidChannel, ch)
	case strings.IndexByte(ch, 0) >= 0:
		return fmt.Errorf("%w %q: holds a NUL byte", ErrInvalidChannel, ch)
	case strings.Contains(ch, "/"):
		return fmt.Errorf("%w %q: holds a /, and a pgstore table name (the text before a key's first /) cannot", ErrInvalidChannel, ch)
	case len(ch) > 63:
		return fmt.Errorf("%w %q: %d bytes, over PostgreSQL's limit of 63 for a table name", ErrInvalidChannel, ch, len(ch))
	}
	return nil
}

// checkKey reports why a key cannot be a pgstore record id.
func checkKey(key string) error {
	switch {
	case key == "":
		return fmt.Errorf("%w: the key is empty", ErrInvalidKey)
	case !utf8.ValidString(key):
		return fmt.Errorf("%w %q: not valid UTF-8", ErrInvalidKey, key)
	case strings.IndexByte(key, 0) >= 0:
		return fmt.Errorf("%w %q: holds a NUL byte, which PostgreSQL text cannot store", ErrInvalidKey, key)
	case len(key) > pgstore.MaxIDBytes:
		return fmt.Errorf("%w: %d bytes, over pgstore's limit of %d (pgstore.MaxIDBytes)", ErrInvalidKey, len(key), pgstore.MaxIDBytes)
	case key == sentinelID:
		return fmt.Errorf("%w %q: reserved by the broker to create channel tables", ErrInvalidKey, key)
	}
	return nil
}

// tableKnown reports whether a channel's table was last seen to exist, so
// that a change reads its records in its first round trip.
func (b *Broker) tableKnown(ch string) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.known[ch]
}

func (b *Broker) setKnown(ch string, exists bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if exists {
		if len(b.known) > 100_000 {
			clear(b.known) // a cache, bounded; it refills as channels are used
		}
		b.known[ch] = true
	} else {
		delete(b.known, ch)
	}
}

// A meta is where a channel stands, read in one statement.
type meta struct {
	logID             string
	position, dropped int64
	tableOID          *uint32 // nil: the table does not exist
	off               int64   // the table's last offset in the log
	base              *int64  // of the channel's last life
	lifeEpoch         *string
	lifeOID           *uint32
	metaExpires       *time.Time // nil: the channel's metadata does not expire
	lastAt            *time.Time // of the broker's last entry of the table
	now               time.Time
}

func (b *Broker) readMeta(ctx context.Context, tx pgx.Tx, ch string) (meta, error) {
	var m meta
	err := tx.QueryRow(ctx, b.sql.meta, ch, b.sql.schema).Scan(m.scan()...)
	return m, err
}

func (m *meta) scan() []any {
	return []any{&m.logID, &m.position, &m.dropped, &m.tableOID, &m.off, &m.base, &m.lifeEpoch, &m.lifeOID, &m.metaExpires, &m.lastAt, &m.now}
}

// exists reports whether the channel's table exists.
func (m meta) exists() bool { return m.tableOID != nil }

// ready reports whether the table exists and the broker has started its
// life: its base and epoch are known.
func (m meta) ready() bool {
	return m.tableOID != nil && m.lifeOID != nil && *m.lifeOID == *m.tableOID && m.base != nil
}

// epoch is the channel's epoch: its life's, or, while it has no table, one
// named after the table's last offset in the log, which the next life
// takes (see ensure), so that reading an empty channel and then publishing
// to it keeps one epoch.
func (m meta) epoch() string {
	if m.ready() {
		return *m.lifeEpoch
	}
	return epochName(m.logID, m.off)
}

func epochName(logID string, off int64) string {
	return fmt.Sprintf("%.16s.%d", logID, off)
}

// top is the offset of the channel's last entry.
func (m meta) top() int64 {
	if !m.ready() {
		return 0
	}
	return m.off - *m.base
}

func (m meta) streamPosition() centrifuge.StreamPosition {
	return centrifuge.StreamPosition{Offset: uint64(m.top()), Epoch: m.epoch()}
}

func isUndefinedTable(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && pgErr.Code == "42P01"
}

// lockKey names a channel's advisory lock.
func (b *Broker) lockKey(ch string) string { return b.sql.schema + "/" + ch }

// keepAlive renews a channel's MetaTTL when it is read, as centrifuge's
// brokers do (the node's position checks of its subscribers read it), but
// at most once per half MetaTTL: a read costs a write only that often.
func (b *Broker) keepAlive(ctx context.Context, ch string, m meta, chOpts centrifuge.MapChannelOptions) {
	if chOpts.MetaTTL <= 0 || !m.ready() || m.metaExpires == nil || m.metaExpires.Sub(m.now) > chOpts.MetaTTL/2 {
		return
	}
	if _, err := b.pool.Exec(ctx, b.sql.metaTouch, ch, *m.base, chOpts.MetaTTL); err != nil {
		b.warn(ctx, "renew the MetaTTL of channel "+ch, err)
	}
}
