package pgstore

import (
	"context"
	"time"
)

// StageMinRows is the number of sets to one table from which a batch is
// copied through the staging table, for tests that must cross it.
const StageMinRows = stageMinRows

// WithStagingRenewal sets how often a session's staging table gets a new
// file, so that a test need not wait for the default.
func WithStagingRenewal(d time.Duration) Option {
	return func(c *config) error {
		c.stagingRenewal = d
		return nil
	}
}

// WithMinAttempt sets the least time a flush attempt is given, so that a
// test of lost answers need not wait out the default.
func WithMinAttempt(d time.Duration) Option {
	return func(c *config) error {
		c.minAttempt = d
		return nil
	}
}

// RotateLog rotates the connector's change log now, as its janitor does when
// half the retention has passed, so that a test can expire entries.
func (c *Connector) RotateLog(ctx context.Context) error {
	_, err := rotateLog(ctx, c.pool, c.cfg.schema, true)
	return err
}

// WithStuckAfter sets how long Check lets a session sit idle in a
// transaction holding the change log's head before it calls it stuck.
func WithStuckAfter(d time.Duration) Option {
	return func(c *config) error {
		c.stuckAfter = d
		return nil
	}
}

// SetLogNotifyRoom makes the log's trigger send its wake-up only while the
// notification queue is less than room full, so that a test can cross the
// bound without filling half of the 8 GB queue.
func (c *Connector) SetLogNotifyRoom(ctx context.Context, room float64) error {
	_, err := c.pool.Exec(ctx, logFunctionSQL(c.cfg.schema, room))
	return err
}

// LogChannel is the channel of the log's wake-ups.
func LogChannel(schema string) string { return logChannel(schema) }
