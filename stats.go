package pgstore

import "time"

// Stats is a snapshot of what a connector is doing, as pgxpool.Pool.Stat is
// of a pool. It reads counters only, and sends no query: it is cheap enough
// for every scrape of a metrics endpoint. Counters count from Connect (or
// New) and never go down.
type Stats struct {
	// BufferedWrites are writes accepted and not yet durable or failed, and
	// BufferedBytes what they hold against WithBufferLimit.
	BufferedWrites, BufferedBytes int
	// Flushes counts the batches written (or failed unsent by Close),
	// whatever their outcome; FlushTime is the time spent on them all
	// told, retries and resolving lost answers included, and LastFlushTime
	// that of the last one.
	Flushes                  int64
	FlushTime, LastFlushTime time.Duration
	// DurableWrites counts the writes made durable. A write that a later
	// one to its key replaced in the buffer shares that one's outcome and
	// is not counted apart.
	DurableWrites int64
	// Retries counts the attempts at a batch after its first; the halves
	// of a batch too large for the server start over as first attempts.
	Retries int64
	// FailedWrites counts the writes that failed after they were accepted
	// (and those the version guard refused at once), by cause. A call
	// refused at the door (a bad key or value, a closed connector) is the
	// caller's to see, and is not counted.
	FailedWrites FailedWrites

	// Listener is the connector's LISTEN connection, which it opens with
	// its first Subscribe. It is a connection of its own, outside the
	// pool: with pool_max_conns=n a connector that subscribes uses n+1.
	Listener ListenerStats

	// Subscriptions is how many are open. EventsDelivered and Resyncs
	// count the handler calls of every subscription, open or closed;
	// Overflows counts the times a subscription of the NOTIFY feed dropped
	// events for a slow handler (a Resync follows each), which a
	// subscription that follows a change log never does.
	Subscriptions                       int
	EventsDelivered, Resyncs, Overflows int64

	// NotifyQueueUsage is the share of the server's notification queue in
	// use (pg_notification_queue_usage), as measured at NotifyQueueAt,
	// once a janitor interval (at most a minute). Near 0 when every
	// listening session reads; a session that stops reading makes it
	// grow, and when it is full every NOTIFY, and so every write to a
	// schema without a change log, fails (Check names the suspects).
	NotifyQueueUsage float64
	NotifyQueueAt    time.Time

	// Log is the schema's change log, nil without one (and without
	// subscriptions that follow another schema's).
	Log *LogStats
}

// FailedWrites counts failed writes by cause.
type FailedWrites struct {
	// Refused: the server refused the write (a value it rejects, a
	// constraint) or the version guard did (a stale version).
	Refused int64
	// TimedOut: the retry timeout passed while the server could not take
	// the write (down, unreachable, failing over).
	TimedOut int64
	// Unknown: the outcome is unknown (ErrOutcomeUnknown).
	Unknown int64
	// Closed: Close's context ended before the write was made durable
	// (ErrClosed).
	Closed int64
}

// ListenerStats is where the LISTEN connection stands.
type ListenerStats struct {
	// Listening: the connection is up and listens on every channel that
	// the subscriptions need, since Since; when not, Since is when it was
	// lost (zero if it never was).
	Listening bool
	Since     time.Time
	// Reconnects counts the lost connections replaced.
	Reconnects int64
}

// LogStats describes the schema's change log, and the subscriptions of this
// connector that follow a change log (the schema's, or another's with
// ForSchema).
type LogStats struct {
	// Bytes is the log's size on disk, entries with their indexes, as
	// measured at BytesAt, once a janitor interval (at most a minute);
	// zero before the first measure.
	Bytes   int64
	BytesAt time.Time
	// Lags has one element per subscription that follows a log.
	Lags []LogLag
}

// LogLag is how far a subscription is behind the log of its schema.
type LogLag struct {
	Schema string
	// Entries is how many entries it has yet to deliver, as of its last
	// read of the log.
	Entries int64
	// Behind is, while Entries is not zero, how long ago the entry it is
	// delivering (or delivered last) was appended; zero once it has caught
	// up. The append's time is the server's, told in this process's clock
	// as of each read of the log, so a difference between the two clocks
	// does not count.
	Behind time.Duration
}

// Stats returns a snapshot of the connector's activity.
func (c *Connector) Stats() Stats {
	b := c.buf.Stats()
	l := c.listener.State()
	st := Stats{
		BufferedWrites: b.Writes,
		BufferedBytes:  b.Bytes,
		Flushes:        b.Flushes,
		FlushTime:      b.FlushTime,
		LastFlushTime:  b.LastFlushTime,
		DurableWrites:  b.Durable,
		Retries:        b.Retries,
		FailedWrites: FailedWrites{
			Refused:  b.Refused,
			TimedOut: b.TimedOut,
			Unknown:  b.Unknown,
			Closed:   b.Closed,
		},
		Listener:        ListenerStats{Listening: l.Listening, Since: l.Since, Reconnects: l.Reconnects},
		EventsDelivered: c.delivered.Load(),
		Resyncs:         c.resyncs.Load(),
		Overflows:       c.overflows.Load(),
	}
	now := time.Now()
	c.subsMu.RLock()
	for _, subs := range c.subs {
		st.Subscriptions += len(subs)
	}
	var lags []LogLag
	for _, subs := range c.logSubs {
		st.Subscriptions += len(subs)
		for s := range subs {
			lag := LogLag{Schema: s.cfg.schema, Entries: max(s.logEnd.Load()-s.logPos.Load(), 0)}
			if at := s.logAt.Load(); lag.Entries > 0 && at != 0 {
				lag.Behind = max(now.Sub(time.Unix(0, at)), 0)
			}
			lags = append(lags, lag)
		}
	}
	c.subsMu.RUnlock()
	if q := c.queueUsage.Load(); q != nil {
		st.NotifyQueueUsage, st.NotifyQueueAt = q.value, q.at
	}
	if c.logged.Load() || len(lags) > 0 {
		st.Log = &LogStats{Lags: lags}
		if size := c.logSize.Load(); size != nil {
			st.Log.Bytes, st.Log.BytesAt = size.value, size.at
		}
	}
	return st
}
