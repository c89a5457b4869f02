package pgstore

import (
	"fmt"
	"io"
	"log/slog"
	"strings"
	"time"
)

// An Option configures a Connector. Options are applied in order by Connect and
// New; an invalid option makes them fail with an error that names it.
type Option func(*config) error

type config struct {
	schema        string
	writeInterval time.Duration
	maxBatchSize  int
	bufferLimit   int
	defaultTable  string
	versionGuard  bool
	tablePolicy   func(table string) error
	logger        *slog.Logger
	retryTimeout  time.Duration
	maxValueBytes int
	changeLog     logChoice
	events        eventSet
	eventsChosen  bool // WithEvents was given: existing triggers follow it
	tracer        Tracer

	stagingRenewal time.Duration // see defaultStagingRenewal; tests shorten it
	minAttempt     time.Duration // see minAttemptTime; tests shorten it
	stuckAfter     time.Duration // see defaultStuckAfter; tests shorten it
}

// Defaults of the options, as documented on each.
const (
	DefaultSchema       = "ds"
	DefaultTable        = "default"
	DefaultMaxBatchSize = 5000
	DefaultBufferLimit  = 64 << 20
	DefaultRetryTimeout = 30 * time.Second
	// DefaultMaxValueBytes is the default of WithMaxValueBytes.
	DefaultMaxValueBytes = 4 << 20
	// DefaultApplicationName is the application_name of the sessions of a
	// pool that Connect opens, unless its connection string sets one.
	DefaultApplicationName = "pgstore"
	// DefaultChangeLogRetention is the retention of a change log that a
	// connector without WithChangeLog makes.
	DefaultChangeLogRetention = time.Hour
)

func defaultConfig() config {
	return config{
		schema:         DefaultSchema,
		maxBatchSize:   DefaultMaxBatchSize,
		bufferLimit:    DefaultBufferLimit,
		defaultTable:   DefaultTable,
		logger:         slog.Default(),
		retryTimeout:   DefaultRetryTimeout,
		maxValueBytes:  DefaultMaxValueBytes,
		events:         allEvents,
		stagingRenewal: defaultStagingRenewal,
		minAttempt:     minAttemptTime,
		stuckAfter:     defaultStuckAfter,
	}
}

// WithSchema sets the PostgreSQL schema that holds the connector's tables. It is
// created if missing. The name is used exactly as given (case and all) and may
// be at most 63 bytes; PostgreSQL's own schemas (public, information_schema,
// pg_*) are refused. Defaults to "ds".
func WithSchema(name string) Option {
	return func(c *config) error {
		if err := checkIdentifier("schema", name); err != nil {
			return fmt.Errorf("WithSchema: %w", err)
		}
		if systemSchema(name) {
			return fmt.Errorf("WithSchema: %q is PostgreSQL's own schema (public, information_schema, pg_*); pgstore keeps its tables and functions in a schema of its own", name)
		}
		c.schema = name
		return nil
	}
}

// WithWriteInterval sets how long an accepted write may wait in the buffer so
// that further writes to the same key coalesce with it. With 0, writes use group
// commit: a batch goes out as soon as no flush is in flight, so a lone write is
// durable after about one round trip and under load batches grow to what the
// server absorbs. Defaults to 0.
func WithWriteInterval(d time.Duration) Option {
	return func(c *config) error {
		if d < 0 {
			return fmt.Errorf("WithWriteInterval: interval must not be negative, got %v", d)
		}
		c.writeInterval = d
		return nil
	}
}

// WithMaxBatchSize bounds how many records one flush writes in one
// transaction; a fuller buffer is flushed in several batches, in order. The
// sets of a batch to one table go by COPY once they number 2,000 or more
// (see the README's Writes), so a limit below that keeps every batch a
// pipeline of array upserts. Defaults to 5000.
func WithMaxBatchSize(n int) Option {
	return func(c *config) error {
		if n < 1 {
			return fmt.Errorf("WithMaxBatchSize: size must be at least 1, got %d", n)
		}
		c.maxBatchSize = n
		return nil
	}
}

// WithBufferLimit bounds, in bytes, the memory held by writes that are accepted
// but not yet durable (keys, values and bookkeeping). When the buffer is full,
// Set and SetAsync wait for a flush to make room; nothing is dropped. A single
// write larger than the limit is accepted when the buffer is empty. Defaults
// to 64 MiB.
func WithBufferLimit(bytes int) Option {
	return func(c *config) error {
		if bytes < 1 {
			return fmt.Errorf("WithBufferLimit: limit must be at least 1 byte, got %d", bytes)
		}
		c.bufferLimit = bytes
		return nil
	}
}

// WithDefaultTable names the table for keys that hold no "/". Defaults to
// "default".
func WithDefaultTable(name string) Option {
	return func(c *config) error {
		if err := checkIdentifier("table", name); err != nil {
			return fmt.Errorf("WithDefaultTable: %w", err)
		}
		if strings.Contains(name, "/") {
			return fmt.Errorf("WithDefaultTable: table name %q holds a /, which would make its keys name another table", name)
		}
		c.defaultTable = name
		return nil
	}
}

// WithVersionGuard, when on, refuses a write whose version is lower than the
// version already stored or buffered for its key, with ErrVersionConflict,
// instead of overwriting newer data. Writes of an equal version go through, so
// retrying a write is harmless. Versions must then be non-negative. Defaults to
// off: the last write wins whatever its version.
func WithVersionGuard(on bool) Option {
	return func(c *config) error {
		c.versionGuard = on
		return nil
	}
}

// WithTablePolicy sets a function that is asked before the connector first
// writes to a table; a non-nil error refuses the write (and is wrapped in the
// error returned). Use it to keep clients from creating unlimited tables.
// Accepted tables are remembered for the life of the connector. The policy may
// read through the connector and write to tables already accepted; a write to
// another new table from inside it fails with an error that says so. Defaults
// to accepting every table.
func WithTablePolicy(policy func(table string) error) Option {
	return func(c *config) error {
		c.tablePolicy = policy
		return nil
	}
}

// WithLogger sets the logger for flush retries, failed writes and the change
// feed's reconnections. A nil logger discards everything. Defaults to
// slog.Default().
func WithLogger(logger *slog.Logger) Option {
	return func(c *config) error {
		if logger == nil {
			logger = slog.New(slog.NewTextHandler(io.Discard, nil))
		}
		c.logger = logger
		return nil
	}
}

// WithRetryTimeout bounds how long a write that fails for a passing reason
// (connection lost, server restarting, serialization failure) is retried with
// backoff, counted from when it is due (accepted, plus the write interval):
// a write fails at most this long, plus one attempt's bound of 5s, after it
// is due, however many batches wait before it. When the answer to a commit
// is lost, the same time bounds the search for its outcome (see
// ErrOutcomeUnknown). Defaults to 30s.
func WithRetryTimeout(d time.Duration) Option {
	return func(c *config) error {
		if d < 0 {
			return fmt.Errorf("WithRetryTimeout: timeout must not be negative, got %v", d)
		}
		c.retryTimeout = d
		return nil
	}
}

// WithMaxValueBytes bounds the size of one record's JSON value, in bytes. A
// larger value is refused at once with ErrInvalidValue, naming the limit,
// before it takes memory in the buffer or time on the server. jsonb itself
// holds at most 255 MiB. Defaults to 4 MiB.
func WithMaxValueBytes(n int) Option {
	return func(c *config) error {
		if n < 1 {
			return fmt.Errorf("WithMaxValueBytes: limit must be at least 1 byte, got %d", n)
		}
		c.maxValueBytes = n
		return nil
	}
}
